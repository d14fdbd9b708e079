"""A real `m2fp serve` process on 127.0.0.1 for tests that talk to the server over TCP (integration, WebUI).

``serve`` runs ``python -m m2fp_service.cli serve`` on a free port with the given model and M2FP_* settings,
waits for ``/readyz`` and sends SIGTERM afterwards.
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

import requests


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def metric(self, name: str) -> float:
        for line in requests.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def healthy(self) -> bool:
        return requests.get(f"{self.url}/healthz", timeout=10).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(model: Path, workdir: Path, **settings: object) -> Iterator[Server]:
    """Starts `m2fp serve` with M2FP_* settings, waits for /readyz, terminates it afterwards."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
    env.update({f"M2FP_{k.upper()}": str(v) for k, v in settings.items()})
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "m2fp_service.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if requests.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after 60 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
