"""Real `m2fp serve` processes on 127.0.0.1 for the integration, hostile-input, fuzzing and load tests.

``serve(model, workdir, **settings)`` starts `python -m m2fp_service.cli serve` on a free port with
``M2FP_*`` settings and its own ``TMPDIR`` (so leftover temporary files can be found), waits for
``/readyz`` and stops it with SIGTERM afterwards. ``Server`` reads the process's figures (RSS, open
descriptors) and its metrics.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

MB = 1024 * 1024


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path
    tmpdir: Path

    def rss_mb(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / MB

    def open_fds(self) -> int:
        return psutil.Process(self.proc.pid).num_fds()

    def tmp_files(self) -> set[Path]:
        """Files in the server's TMPDIR (ONNX Runtime writes a 51-byte ``.ses`` there at start)."""
        return {p for p in self.tmpdir.rglob("*") if p.is_file()}

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics, by name (plus labelled ones as ``name{labels}``)."""
        out = {}
        for line in requests.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str) -> float:
        return self.metrics()[name]

    def healthy(self) -> bool:
        return requests.get(f"{self.url}/healthz", timeout=10).status_code == 200

    def wait_idle(self, timeout_s: float = 60) -> None:
        """Until no parse runs or waits and only the metrics request itself is in flight."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            if m["m2fp_workers_busy"] == 0 and m["m2fp_queue_depth"] == 0 and m["m2fp_http_requests_in_flight"] <= 1:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout_s} s: {m}")
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(model: Path, workdir: Path, **settings: object) -> Server:
    """Starts `m2fp serve` (does not wait for it)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
    env.update({f"M2FP_{k.upper()}": str(v) for k, v in settings.items()})
    workdir.mkdir(parents=True, exist_ok=True)
    tmpdir = workdir / f"tmp-{port}"
    tmpdir.mkdir()
    env["TMPDIR"] = str(tmpdir)
    log = workdir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "m2fp_service.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    return Server(proc, f"http://127.0.0.1:{port}", port, log, tmpdir)


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@contextmanager
def serve(model: Path, workdir: Path, **settings: object) -> Iterator[Server]:
    """Starts `m2fp serve` with M2FP_* settings, waits for /readyz, terminates it afterwards."""
    server = start(model, workdir, **settings)
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.proc.poll() is not None:
                raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.log.read_text()}")
            try:
                if requests.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after 60 s:\n{server.log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        stop(server)


def parse(server: Server, data: bytes, outputs: str = "", name: str = "test.jpg") -> requests.Response:
    return requests.post(f"{server.url}/api/parse", params={"outputs": outputs} if outputs else None,
                         files={"image": (name, data, "image/jpeg")}, timeout=120)


def assert_non_trivial(result: dict) -> None:  # type: ignore[type-arg]
    assert result["code"] == 0, result
    assert len(result["data"]["classes"]) >= 3, "several classes must be present"
    if "people" in result["data"]:
        assert len(result["data"]["people"]) >= 2, "people must be found"
