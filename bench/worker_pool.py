"""Worker-pool shapes under concurrent load: threads vs processes, workers x intra-op threads.

Two ways to measure, both on the astronaut pair (512x1024 JPEG) with the seed's outputs:

- ``--http``: starts a real ``m2fp serve`` with M2FP_WORKERS / M2FP_INTRA_OP_THREADS and posts
  to /api/parse from 1, 2, 4 client threads (the service's actual thread pool);
- ``--pool threads|processes``: the same job (decode, parse, encode) in a ThreadPoolExecutor
  sharing one session, or a spawned ProcessPoolExecutor with a session per process.

Each line reports images/s, median latency and the server's RSS, and how many cores processes
outside this benchmark used meanwhile (on a shared box, discard lines where that is not ~0).

Usage::

    python bench/worker_pool.py MODEL.onnx --http --workers 1 --threads 2
    python bench/worker_pool.py MODEL.onnx --pool processes --workers 2 --threads 1
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

_engine = None


def photo_jpeg() -> bytes:
    from skimage import data

    a = data.astronaut()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.concatenate([a, a[:, ::-1]], 1))).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _init(model: str, threads: int) -> None:
    global _engine
    from m2fp_service.engine import ParsingEngine

    _engine = ParsingEngine(Path(model), threads)


def _job(jpg: bytes) -> int:
    from m2fp_service.api.routes.parse import parse_to_json
    from m2fp_service.config import Settings
    from m2fp_service.pipeline import ResultCache, Timings
    from m2fp_service.schemas import ParseParams

    assert _engine is not None
    settings = Settings(_env_file=None, max_pixels=40_000_000, max_side=16384, mask_resolution="fast")  # type: ignore[call-arg]
    no_cache = ResultCache(0)  # every job runs inference: this measures throughput, not the cache
    return len(parse_to_json(_engine, jpg, ParseParams(), settings, no_cache, Timings()))


def _busy_jiffies() -> int:
    f = list(map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]))
    return sum(f) - f[3] - f[4]


def _visible_jiffies() -> int:
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15])
        except OSError:
            pass
    return total


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return total / 1024


def load(call: Callable[[], object], concurrency: tuple[int, ...], n: int) -> list[str]:
    """Runs ``n`` calls from each number of client threads; one report per concurrency."""
    out = []
    for c in concurrency:
        latencies: list[float] = []
        lock = threading.Lock()

        def client(count: int, latencies: list[float] = latencies, lock: threading.Lock = lock) -> None:
            for _ in range(count):
                t = time.perf_counter()
                call()
                with lock:
                    latencies.append(time.perf_counter() - t)

        b0, v0, t0 = _busy_jiffies(), _visible_jiffies(), time.perf_counter()
        threads = [threading.Thread(target=client, args=(max(1, n // c),)) for _ in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        foreign = ((_busy_jiffies() - b0) - (_visible_jiffies() - v0)) / 100 / wall
        out.append(f"c={c}: {len(latencies) / wall:.2f} img/s p50 {statistics.median(latencies) * 1000:.0f} ms "
                   f"[other load {max(0.0, foreign):.2f} cores]")
    return out


def run_http(args: argparse.Namespace, jpg: bytes) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "M2FP_WORKERS": str(args.workers), "M2FP_INTRA_OP_THREADS": str(args.threads),
           "M2FP_QUEUE_SIZE": "64", "M2FP_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "m2fp_service.cli", "serve", "--model", args.model,
                             "--port", str(port)], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if requests.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)

        def post() -> None:
            r = requests.post(url + "/api/parse", files={"image": ("a.jpg", jpg, "image/jpeg")}, timeout=600)
            assert r.status_code == 200, r.text

        for _ in range(2 * args.workers):
            post()
        lines = load(post, args.concurrency, args.n)
        rss = _rss_mb([proc.pid])
    finally:
        proc.terminate()
        proc.wait()
    return f"http   workers={args.workers} intra={args.threads}: " + "  ".join(lines) + f"  RSS {rss:.0f} MB"


def run_pool(args: argparse.Namespace, jpg: bytes) -> str:
    ex: Executor
    if args.pool == "threads":
        _init(args.model, args.threads)
        ex = ThreadPoolExecutor(args.workers)
    else:
        ex = ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_init,
                                 initargs=(args.model, args.threads))
    try:
        list(ex.map(_job, [jpg] * 2 * args.workers))
        lines = load(lambda: ex.submit(_job, jpg).result(), args.concurrency, args.n)
        pids = [os.getpid()]
        if isinstance(ex, ProcessPoolExecutor):
            pids += list(ex._processes)  # noqa: SLF001 - the only way to see the children
        rss = _rss_mb(pids)
    finally:
        ex.shutdown()
    return f"{args.pool:9s} workers={args.workers} intra={args.threads}: " + "  ".join(lines) + f"  RSS {rss:.0f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--http", action="store_true", help="load a real `m2fp serve`")
    mode.add_argument("--pool", choices=["threads", "processes"], help="load an executor in this process")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads per worker")
    p.add_argument("--concurrency", type=lambda s: tuple(int(v) for v in s.split(",")), default=(1, 2, 4))
    p.add_argument("-n", type=int, default=16, help="requests per concurrency level")
    args = p.parse_args()
    jpg = photo_jpeg()
    print(run_http(args, jpg) if args.http else run_pool(args, jpg), flush=True)


if __name__ == "__main__":
    main()
