"""The server under load: Locust (headless, bounded in time) at concurrency 1, 4 and 16.

For each concurrency a fresh ``m2fp serve`` (one worker, 2 threads, default queue of 4) is
started, Locust runs ``--seconds`` with that many users (each posts the 720p JPEG and waits for
the answer; on 503 it waits Retry-After), then the server's peak RSS (VmHWM) is read. Reported:
served requests per second, p50/p95/p99 of served requests, the status-code mix, peak RSS.

Usage (``make bench`` runs it)::

    python bench/load.py [--quick] [--seconds 90] [--model fp32|int8]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import BusyMeter, loadavg, models, write_json  # noqa: E402
from e2e import Server  # noqa: E402

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def one_level(model: Path, users: int, seconds: float) -> dict[str, Any]:
    server = Server(model)
    meter = BusyMeter([server.proc.pid])
    try:
        with tempfile.TemporaryDirectory(prefix="m2fp-load-") as tmp:
            prefix = Path(tmp) / "stats"
            status_out = Path(tmp) / "status.json"
            cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
                   "-r", str(users), "-t", f"{int(seconds)}s", "--host", server.url, "--csv", str(prefix),
                   "--only-summary", "--stop-timeout", "600", "--loglevel", "WARNING"]
            import os

            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env={**os.environ, "M2FP_BENCH_STATUS_OUT": str(status_out)},
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t0  # the bounded run, plus letting in-flight requests finish
            if not status_out.is_file():
                raise SystemExit(f"locust failed ({proc.returncode}): {proc.stderr[-3000:]}")
            recorded = json.loads(status_out.read_text())
            statuses, served_s = recorded["statuses"], recorded["served_s"]
            errors = recorded.get("errors", {})
            with open(f"{prefix}_stats.csv", newline="") as fh:
                rows = {r["Name"]: r for r in csv.DictReader(fh)}
        peak = server.peak_rss_mb()
    finally:
        server.stop()
    row = rows.get("/api/parse") or rows["Aggregated"]
    served = statuses.get("200", 0)

    def pct(q: float) -> float | None:  # latency percentiles of the served (200) requests
        return float(np.percentile(served_s, q)) if served_s else None

    return {
        "users": users, "seconds": seconds, "wall_s": wall, "statuses": statuses, "errors": errors,
        "served_per_s": served / wall,
        "p50_s": pct(50), "p95_s": pct(95), "p99_s": pct(99),
        "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
        "peak_rss_mb": peak, "startup_s": server.startup_s, "other_cores": meter.other_cores(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--model", choices=["fp32", "int8"], default="int8")
    ap.add_argument("--users", default="1,4,16")
    args = ap.parse_args()
    m = models(args.quick)
    model = m.int8 if args.model == "int8" else m.fp32
    report: dict[str, Any] = {"loadavg_before": loadavg(), "model": args.model, "levels": []}
    for users in (int(u) for u in args.users.split(",")):
        print(f"load: {users} users for {args.seconds:g} s ...", file=sys.stderr, flush=True)
        report["levels"].append(one_level(model, users, args.seconds))
    report["loadavg_after"] = loadavg()
    print(f"wrote {write_json('load', report)}", file=sys.stderr)


if __name__ == "__main__":
    main()
