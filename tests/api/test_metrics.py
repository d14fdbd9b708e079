"""GET /metrics: Prometheus counters and histograms per route, status and pipeline stage."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from m2fp_service.pipeline import STAGES
from tests.api.conftest import image_file


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_parse_is_counted_and_timed_per_stage(client: TestClient, photo_jpeg: bytes) -> None:
    before = samples(client)
    assert client.post("/api/parse", files=image_file(photo_jpeg)).status_code == 200
    assert client.post("/api/parse", files=image_file(b"not an image")).status_code == 422
    client.get("/no/such/page")
    after = samples(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("m2fp_http_requests_total", route="/api/parse", method="POST", status="200") == 1
    assert delta("m2fp_http_requests_total", route="/api/parse", method="POST", status="422") == 1
    assert delta("m2fp_http_requests_total", route="<unmatched>", method="GET", status="404") == 1
    assert delta("m2fp_http_request_duration_seconds_count", route="/api/parse", method="POST") == 2
    for stage in STAGES:
        assert delta("m2fp_stage_duration_seconds_count", stage=stage) == 1, stage
        assert delta("m2fp_stage_duration_seconds_sum", stage=stage) > 0, stage
    assert delta("m2fp_queue_wait_seconds_count") == 1
    assert value(after, "m2fp_queue_depth") == 0
    assert value(after, "m2fp_workers_busy") == 0
    assert value(after, "m2fp_http_requests_in_flight") == 1  # the scrape itself
    assert value(after, "m2fp_model_ready") == 1
    assert value(after, "m2fp_model_trained") == 0
    assert ("m2fp_rejected_total", (("reason", "overloaded"),)) in after


def test_metrics_are_per_app(make_client) -> None:  # type: ignore[no-untyped-def]
    a, b = make_client(), make_client()
    a.get("/healthz")
    assert value(samples(b), "m2fp_http_requests_total", route="/healthz", method="GET", status="200") == 0
