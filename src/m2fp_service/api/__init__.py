"""HTTP layer: FastAPI app, routes, worker pool, logging, metrics."""
