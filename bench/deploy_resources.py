"""Memory and CPU of a real ``m2fp serve``, for the Kubernetes requests and limits (docs/deploy.md).

Starts ``m2fp serve`` (with ``--python``: from another environment, e.g. one holding only the
image's runtime set) on the given model with the Deployment's settings (one worker, intra-op
threads = the CPU limit, queue 4) and samples the server's RSS (psutil, every 50 ms) and its CPU
time while it serves, in phases:

- ``idle``: loaded and warmed up, no request;
- ``720p x1``: three 1280x720 JPEGs one after another;
- ``720p x4``: four at once (one runs, three wait in the queue);
- ``720p x8``: eight at once (queue 4: the surplus gets 503 at once);
- ``4MP x1``: a 2560x1600 photo (the largest post-processed at full size in ``exact`` mode);
- ``40MP x1``: an 8000x5000 photo (``M2FP_MAX_PIXELS``, the largest accepted upload).

Each phase reports peak RSS, CPU seconds per served image (what the work costs, whatever else
runs on the machine), CPU cores used (CPU seconds / wall seconds: low when other processes
compete for the cores, so read it with the 1-minute load average beside it), statuses, and the
slowest ``/healthz`` answer seen meanwhile (the liveness probe's timeout must exceed it).

Usage::

    python bench/deploy_resources.py models/m2fp.onnx [--python /path/to/runtime/bin/python] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402


def photo_jpeg(w: int, h: int) -> bytes:
    """scikit-image's astronaut twice side by side (two people), resized to ``w`` x ``h``, JPEG q90."""
    from skimage import data

    a = data.astronaut()
    pair = Image.fromarray(np.ascontiguousarray(np.concatenate([a, a[:, ::-1]], 1)))
    buf = io.BytesIO()
    pair.resize((w, h), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def numbered(jpeg: bytes, n: int) -> bytes:
    """``jpeg`` with a comment segment holding ``n`` after its start marker: the same picture in a file of its
    own (the server caches results by the file's bytes), made in microseconds, outside the server's way."""
    comment = f"request {n}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


class Sampler:
    """Peak RSS of a process tree, sampled on a thread until stopped."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc, self.peak, self._stop = proc, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def phase(name: str, proc: psutil.Process, url: str, work: Callable[[], list[int]]) -> dict[str, Any]:
    health: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            t = time.perf_counter()
            requests.get(url + "/healthz", timeout=30).raise_for_status()
            health.append(time.perf_counter() - t)
            time.sleep(0.5)

    cpu0, t0 = proc.cpu_times(), time.perf_counter()
    prober = threading.Thread(target=probe, daemon=True)
    with Sampler(proc) as sampler:
        prober.start()
        statuses = work()
        done.set()
        prober.join()
    wall = time.perf_counter() - t0
    cpu1 = proc.cpu_times()
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    served = statuses.count(200)
    row = {"phase": name, "peak_rss_mib": round(sampler.peak / 2**20), "wall_s": round(wall, 1),
           "cpu_cores": round(cpu_s / wall, 2), "cpu_s_per_image": round(cpu_s / served, 1) if served else None,
           "statuses": statuses, "healthz_max_ms": round(max(health, default=0.0) * 1000),
           "load_avg_1m": round(os.getloadavg()[0], 1)}
    print(row, file=sys.stderr, flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "M2FP_WORKERS": "1", "M2FP_INTRA_OP_THREADS": str(args.threads), "M2FP_QUEUE_SIZE": "4",
           "M2FP_LOG_LEVEL": "warning", "M2FP_MODEL": str(args.model), "M2FP_PORT": str(port),
           "M2FP_HOST": "127.0.0.1", "M2FP_REQUEST_TIMEOUT_S": "600"}
    server = subprocess.Popen([args.python, "-m", "m2fp_service.cli", "serve"], env=env, stderr=subprocess.DEVNULL)
    proc = psutil.Process(server.pid)
    url = f"http://127.0.0.1:{port}"
    photos = {"720p": photo_jpeg(1280, 720), "4MP": photo_jpeg(2560, 1600), "40MP": photo_jpeg(8000, 5000)}
    sent = iter(range(1, 1 << 16))  # every request a file of its own: no answer from the result cache
    lock = threading.Lock()

    def post(kind: str) -> int:
        with lock:
            photo = numbered(photos[kind], next(sent))
        r = requests.post(url + "/api/parse", files={"image": ("p.jpg", photo, "image/jpeg")}, timeout=900)
        return r.status_code

    def concurrent(kind: str, n: int) -> Callable[[], list[int]]:
        def go() -> list[int]:
            with ThreadPoolExecutor(n) as ex:
                return sorted(ex.map(lambda _: post(kind), range(n)))
        return go

    def idle() -> list[int]:
        time.sleep(3)
        return []

    rows = []
    try:
        t0 = time.perf_counter()
        while True:
            try:
                if requests.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None:
                raise SystemExit("the server exited before it was ready")
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        phases: dict[str, Callable[[], list[int]]] = {
            "idle": idle,
            "720p x1": lambda: [post("720p") for _ in range(3)],
            "720p x4": concurrent("720p", 4),
            "720p x8": concurrent("720p", 8),
            "4MP x1": lambda: [post("4MP")],
            "40MP x1": lambda: [post("40MP")],
        }
        for name, work in phases.items():
            if not args.phases or name in args.phases:
                rows.append(phase(name, proc, url, work))
    finally:
        server.terminate()
        server.wait(60)
    return {"model": str(args.model), "python": args.python, "threads": args.threads,
            "cpu_count": os.cpu_count(), "ready_s": round(ready_s, 1), "phases": rows}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"`m2fp serve`, 1 worker x {report['threads']} threads, queue 4; ready after {report['ready_s']} s", "",
             "| phase | peak RSS | CPU s / image | CPU cores used | wall | statuses | slowest /healthz | load avg |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in report["phases"]:
        lines.append(f"| {r['phase']} | {r['peak_rss_mib']} MiB | {r['cpu_s_per_image'] or '-'} | {r['cpu_cores']} | "
                     f"{r['wall_s']} s | {','.join(map(str, r['statuses'])) or '-'} | {r['healthz_max_ms']} ms | "
                     f"{r['load_avg_1m']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--python", default=sys.executable, help="interpreter whose environment runs the server")
    p.add_argument("--threads", type=int, default=2, help="M2FP_INTRA_OP_THREADS (= the CPU limit)")
    p.add_argument("--phases", type=lambda v: [x.strip() for x in v.split(",")], default=None,
                   help="comma-separated subset, e.g. 'idle,720p x1' (default: all)")
    p.add_argument("--out", type=Path, default=Path("bench/studies/deploy_resources.json"))
    args = p.parse_args()
    emit(run(args), markdown, args.out)


if __name__ == "__main__":
    main()
