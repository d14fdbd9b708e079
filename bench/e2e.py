"""End to end on the 720p JPEG: the reference pipeline vs a real ``m2fp serve`` over HTTP, and start-up.

- **Reference**, in its own fresh process: JPEG bytes -> PIL -> ModelScope's real
  ``ImageHumanParsingPipeline`` (preprocess -> forward = network + ModelScope's full-resolution
  post-processing -> postprocess) on PyTorch eager with 2 threads, the same weights
  (``random_init(config, seed 0, confident)``) and the same input size (its own policy: short
  edge 640). Stages are timed apart; peak RSS is the process's VmHWM.
- **Ours**: a real ``m2fp serve`` process per model (FP32, INT8, INT8 with the fast input
  profile), one worker with 2 threads, ``POST /api/parse`` with the JPEG (the seed's fields).
  Time per request is the client's wall time; the stages come from the ``Server-Timing`` header;
  peak RSS is the server process's VmHWM after the requests, reset once it is ready (so it is
  serving's; loading's own peak is recorded apart).
- **Start-up**: process start to the first ``/readyz`` 200 (model loaded and warmed up), per
  model, with the optimised-graph cache cold (disabled) and warm (written by the previous start).

The paths run interleaved: all processes are started first (the reference child waits for
commands on its stdin), each warms up once, then each of ``--repeat`` rounds makes one run/request
per path in turn. This machine's speed drifts by 20-40% within minutes; within a round every path
sees the same machine, so each round gives its own "reference ÷ ours" ratio and the report takes
their median. Writes bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    THREADS,
    BusyMeter,
    Models,
    loadavg,
    models,
    peak_rss_mb,
    photo_jpeg,
    reset_peak_rss,
    stats,
    write_json,
)
from PIL import Image  # noqa: E402

# --------------------------------------------------------------------------------------------
# The reference, in a child process
# --------------------------------------------------------------------------------------------


REPLY = "M2FP-BENCH "  # marks the child's answers among whatever else the libraries print


def child_reference(config: str, jpeg: Path, scratch: Path) -> None:
    """The reference pipeline, driven by lines on stdin: ``run`` (answers one run's stage times) and
    ``finish`` (saves the last run's label map, answers peak RSS and people), each answer a line of JSON."""
    import torch

    torch.set_num_threads(THREADS)
    from m2fp_export.source import random_init

    loaded = random_init(config, seed=0, confident=True)
    from modelscope.pipelines.cv.image_human_parsing_pipeline import ImageHumanParsingPipeline

    model = loaded.model
    (scratch / "configuration.json").write_text(json.dumps(
        {"framework": "pytorch", "task": "image-segmentation", "pipeline": {"type": "image-human-parsing"},
         "model": loaded.model_cfg}))
    model.model_dir = str(scratch)
    pipe = ImageHumanParsingPipeline(model=model, device="cpu")
    network_forward = model.forward
    last: dict[str, float] = {}

    def timed_forward(input: dict[str, Any]) -> dict[str, Any]:  # noqa: A002 - ModelScope inspects the name
        t = time.perf_counter()
        out = network_forward(input)
        last["network"] = time.perf_counter() - t
        return out

    model.forward = timed_forward
    data = jpeg.read_bytes()
    label_map, people = None, 0
    print(REPLY + "{}", flush=True)  # loaded
    for line in sys.stdin:
        if line.strip() == "finish":
            assert label_map is not None, "finish before any run"
            np.save(scratch / "reference_labels.npy", label_map)
            print(REPLY + json.dumps({"peak_rss_mb": peak_rss_mb(), "people": people,
                                      "torch_threads": torch.get_num_threads()}), flush=True)
            return
        t0 = time.perf_counter()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        t1 = time.perf_counter()
        inputs = pipe.preprocess(image)
        t2 = time.perf_counter()
        with torch.no_grad():
            out = pipe.forward(inputs)
        t3 = time.perf_counter()
        result = pipe.postprocess(out)
        t4 = time.perf_counter()
        parsing = out["eval_result"][0]["parsing"]
        label_map = parsing["semantic_outputs"].argmax(0).numpy().astype(np.uint8)
        people = sum(1 for label in result["labels"] if label == "human")
        del inputs, out, result, parsing  # nothing of this run lives into the next (its peak RSS)
        print(REPLY + json.dumps({"total": t4 - t0, "decode": t1 - t0, "preprocess": t2 - t1, "infer": last["network"],
                                  "postprocess": t3 - t2 - last["network"], "encode": t4 - t3}), flush=True)


class Reference:
    """The reference child process (``child_reference``)."""

    def __init__(self, m: Models, jpeg: Path, scratch: Path) -> None:
        self.log = (scratch / "reference.log").open("w+")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", "reference", "--config", m.config, "--jpeg", str(jpeg),
             "--scratch", str(scratch)],
            env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONWARNINGS": "ignore"},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return dict(json.loads(line[len(REPLY):]))
        self.log.seek(0)
        sys.stderr.write(self.log.read()[-6000:])
        raise SystemExit(f"reference child failed ({self.proc.wait()})")

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def finish(self) -> dict[str, Any]:
        result = self.ask("finish")
        self.proc.wait(60)
        self.log.close()
        return result


# --------------------------------------------------------------------------------------------
# Ours: a real server
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``m2fp serve`` in a subprocess; ``startup_s`` = process start to the first /readyz 200.

    The result cache is off: every benchmark request sends the same photo, and a cached answer
    would measure a lookup, not the service (``M2FP_RESULT_CACHE_MB=0``)."""

    def __init__(self, model: Path, env: dict[str, str] | None = None, timeout_s: float = 600) -> None:
        import requests

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "M2FP_WORKERS": "1", "M2FP_INTRA_OP_THREADS": str(THREADS),
                    "M2FP_LOG_LEVEL": "warning", "M2FP_REQUEST_TIMEOUT_S": "600", "M2FP_RESULT_CACHE_MB": "0",
                    **(env or {})}
        # Its stderr goes to a file: a pipe nobody reads would block a server that logs a lot while it
        # waits for its next round.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - as long as the server lives; closed by stop()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "m2fp_service.cli", "serve", "--model", str(model),
                                      "--port", str(self.port)], env=full_env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")[-3000:]
                raise SystemExit(f"server exited: {err}")
            try:
                if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - t0 > timeout_s:
                self.stop()
                raise SystemExit("server did not become ready")
            time.sleep(0.05)
        self.startup_s = time.perf_counter() - t0

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur) / 1000.0
    return out


class Ours:
    """A real server on one model; ``request`` times one ``POST /api/parse`` of the JPEG."""

    def __init__(self, model: Path, jpeg: bytes, env: dict[str, str] | None = None) -> None:
        self.server = Server(model, env)
        self.files = {"image": ("photo.jpg", jpeg, "image/jpeg")}
        # Loading has its own peak (~1 GB for FP32 when the graph is rewritten, i.e. without a warm
        # optimised-graph cache): kept apart, and the peak measured from here on is serving's.
        self.load_peak_mb = self.server.peak_rss_mb()
        self.serving_only = reset_peak_rss(self.server.proc.pid)

    def request(self) -> dict[str, float]:
        import requests

        t = time.perf_counter()
        r = requests.post(self.server.url + "/api/parse", files=self.files, timeout=600)
        wall = time.perf_counter() - t
        r.raise_for_status()
        return {"total": wall, **_server_timing(r.headers.get("Server-Timing", ""))}

    def finish(self) -> tuple[dict[str, Any], np.ndarray]:
        """Peak RSS, start-up time and people, and the label map; the server stopped."""
        import requests

        try:
            peak = self.server.peak_rss_mb()
            check = requests.post(self.server.url + "/api/parse?outputs=label,people", files=self.files,
                                  timeout=600).json()["data"]
            label_png = check.get("label_map") or check["label"]  # the field's name in the response schema
            labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(label_png))))
        finally:
            self.server.stop()
        return {"peak_rss_mb": peak, "load_peak_rss_mb": self.load_peak_mb, "peak_is_serving_only": self.serving_only,
                "startup_s": self.server.startup_s, "people": len(check["people"])}, labels


def startup(model: Path, repeat: int) -> dict[str, Any]:
    """Start-up with the optimised-graph cache off (cold) and warm (the first start writes it)."""
    out: dict[str, list[float]] = {"cache_off": [], "cache_warm": []}
    with tempfile.TemporaryDirectory(prefix="m2fp-ort-cache-") as cache:
        for i in range(repeat + 1):
            s = Server(model, {"M2FP_ORT_CACHE_DIR": cache})
            s.stop()
            if i:  # the first start wrote the cache
                out["cache_warm"].append(s.startup_s)
        for _ in range(repeat):
            s = Server(model, {"M2FP_ORT_OPTIMIZED_CACHE": "false"})
            s.stop()
            out["cache_off"].append(s.startup_s)
    return {k: stats(v) for k, v in out.items()}


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    keys = sorted({k for r in runs for k in r})
    return {k: stats([r[k] for r in runs if k in r]) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--startup-repeat", type=int, default=2)
    ap.add_argument("--child", choices=["reference"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--jpeg", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_reference(args.config, args.jpeg, args.scratch)
        return
    m = models(args.quick)
    jpeg = photo_jpeg()
    report: dict[str, Any] = {"loadavg_before": loadavg(), "repeat": args.repeat, "jpeg_bytes": len(jpeg),
                              "photo": "astronaut + mirror image, 1280x720, JPEG q90", "config": m.config}
    variants = {"ours-fp32": (m.fp32, {}), "ours-int8": (m.int8, {}),
                "ours-int8-fast": (m.int8, {"M2FP_INPUT_PROFILE": "fast"}),
                "ours-fp32-fast": (m.fp32, {"M2FP_INPUT_PROFILE": "fast"})}
    labels: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="m2fp-e2e-") as tmp:
        scratch = Path(tmp)
        (scratch / "photo.jpg").write_bytes(jpeg)
        print("e2e: starting the reference pipeline and the servers ...", file=sys.stderr, flush=True)
        reference = Reference(m, scratch / "photo.jpg", scratch)
        ours: dict[str, Ours] = {}
        try:
            for name, (model, env) in variants.items():
                ours[name] = Ours(model, jpeg, env)
            meter = BusyMeter([reference.proc.pid, *(o.server.proc.pid for o in ours.values())])
            calls = {"reference": lambda: reference.ask("run"), **{name: o.request for name, o in ours.items()}}
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in calls}
            for i in range(args.repeat + 1):  # the first round warms up
                for name, call in calls.items():
                    result = call()
                    if i:
                        runs[name].append(result)
                print(f"e2e: round {i} " + ", ".join(f"{n} {r[-1]['total']:.2f} s" for n, r in runs.items())
                      if i else "e2e: warm-up round done", file=sys.stderr, flush=True)
            other = meter.other_cores()
            paths: dict[str, dict[str, Any]] = {"reference": reference.finish()}
            ref_labels = np.load(scratch / "reference_labels.npy")
            for name, o in ours.items():
                paths[name], labels[name] = o.finish()
        finally:
            for o in ours.values():
                if o.server.proc.poll() is None:
                    o.server.stop()
            if reference.proc.poll() is None:
                reference.proc.kill()
                reference.proc.wait()
    for name, result in paths.items():
        result["stages"] = summarize(runs[name])
        # Per request: its own total minus its own inference (two medians taken apart can come from different
        # requests, and one slow stage in one round moves their difference).
        shares = [(r["total"] - r["infer"]) / r["infer"] for r in runs[name] if r.get("infer")]
        if shares:
            result["around_inference"] = stats(shares)
        result["other_cores"] = other
        result["vs_reference"] = stats([r["total"] / own["total"] for r, own in zip(runs["reference"], runs[name],
                                                                                     strict=True)])
    ref = paths["reference"]
    checks = {name: {"label_agreement_vs_reference": float((lab == ref_labels).mean()),
                     "people": paths[name]["people"]} for name, lab in labels.items()}
    checks["ours-int8"]["label_agreement_vs_fp32"] = float((labels["ours-int8"] == labels["ours-fp32"]).mean())
    checks["ours-fp32-fast"]["label_agreement_vs_default_profile"] = float(
        (labels["ours-fp32-fast"] == labels["ours-fp32"]).mean())
    checks["ours-int8-fast"]["label_agreement_vs_fp32_default"] = float(
        (labels["ours-int8-fast"] == labels["ours-fp32"]).mean())
    checks["reference"] = {"people": ref["people"], "classes": int(len(np.unique(ref_labels)))}
    report["paths"] = paths
    report["checks"] = checks
    print("e2e: start-up ...", file=sys.stderr, flush=True)
    report["startup"] = {"fp32": startup(m.fp32, args.startup_repeat), "int8": startup(m.int8, args.startup_repeat)}
    report["loadavg_after"] = loadavg()
    print(f"wrote {write_json('e2e', report)}", file=sys.stderr)


if __name__ == "__main__":
    main()
