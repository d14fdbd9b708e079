"""End to end on the 720p JPEG: the reference pipeline vs a real ``m2fp serve`` over HTTP, and start-up.

- **Reference**, in its own fresh process: JPEG bytes -> PIL -> ModelScope's real
  ``ImageHumanParsingPipeline`` (preprocess -> forward = network + ModelScope's full-resolution
  post-processing -> postprocess) on PyTorch eager with 2 threads, the same weights
  (``random_init(config, seed 0, confident)``) and the same input size (its own policy: short
  edge 640). Stages are timed apart; peak RSS is the process's VmHWM.
- **Ours**: a real ``m2fp serve`` process per model (FP32, INT8, INT8 with the fast input
  profile), one worker with 2 threads, ``POST /api/parse`` with the JPEG (the seed's fields).
  Time per request is the client's wall time; the stages come from the ``Server-Timing`` header;
  peak RSS is the server process's VmHWM after the requests.
- **Start-up**: process start to the first ``/readyz`` 200 (model loaded and warmed up), per
  model, with the optimised-graph cache cold (disabled) and warm (written by the previous start).

Each path warms up once, then times ``--repeat`` requests/runs. Writes bench/results/e2e.json.
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
    stats,
    write_json,
)
from PIL import Image  # noqa: E402

# --------------------------------------------------------------------------------------------
# The reference, in a child process
# --------------------------------------------------------------------------------------------


def child_reference(config: str, jpeg: Path, repeat: int, scratch: Path) -> dict[str, Any]:
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
    runs = []
    label_map, people = None, 0
    for i in range(repeat + 1):
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
        if i == repeat:
            parsing = out["eval_result"][0]["parsing"]
            label_map = parsing["semantic_outputs"].argmax(0).numpy().astype(np.uint8)
            people = sum(1 for label in result["labels"] if label == "human")
        del inputs, out, result
        if i:
            runs.append({"total": t4 - t0, "decode": t1 - t0, "preprocess": t2 - t1, "infer": last["network"],
                         "postprocess": t3 - t2 - last["network"], "encode": t4 - t3})
    assert label_map is not None
    np.save(scratch / "reference_labels.npy", label_map)
    return {"runs": runs, "peak_rss_mb": peak_rss_mb(), "people": people, "torch_threads": torch.get_num_threads()}


def run_reference(m: Models, jpeg: Path, repeat: int, scratch: Path) -> dict[str, Any]:
    out = scratch / "reference.json"
    meter = BusyMeter()
    proc = subprocess.run([sys.executable, __file__, "--child", "reference", "--config", m.config, "--jpeg", str(jpeg),
                           "--repeat", str(repeat), "--scratch", str(scratch), "--child-out", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"reference child failed ({proc.returncode})")
    result = json.loads(out.read_text())
    result["other_cores"] = meter.other_cores()
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
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "m2fp_service.cli", "serve", "--model", str(model),
                                      "--port", str(self.port)], env=full_env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode()[-3000:] if self.proc.stderr else ""
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


def _server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur) / 1000.0
    return out


def run_ours(model: Path, jpeg: bytes, repeat: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    import requests

    server = Server(model, env)
    meter = BusyMeter([server.proc.pid])
    try:
        files = {"image": ("photo.jpg", jpeg, "image/jpeg")}
        runs = []
        for i in range(repeat + 1):
            t = time.perf_counter()
            r = requests.post(server.url + "/api/parse", files=files, timeout=600)
            wall = time.perf_counter() - t
            r.raise_for_status()
            if i:
                runs.append({"total": wall, **_server_timing(r.headers.get("Server-Timing", ""))})
        peak = server.peak_rss_mb()
        check = requests.post(server.url + "/api/parse?outputs=label,people", files=files, timeout=600).json()["data"]
        label_png = check.get("label_map") or check["label"]  # the field's name in the response schema
        labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(label_png))))
    finally:
        server.stop()
    return {"runs": runs, "peak_rss_mb": peak, "startup_s": server.startup_s, "people": len(check["people"]),
            "labels": labels, "other_cores": meter.other_cores()}


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
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--startup-repeat", type=int, default=2)
    ap.add_argument("--child", choices=["reference"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--jpeg", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child_reference(args.config, args.jpeg, args.repeat, args.scratch)
        args.child_out.write_text(json.dumps(result))
        return
    m = models(args.quick)
    jpeg = photo_jpeg()
    report: dict[str, Any] = {"loadavg_before": loadavg(), "repeat": args.repeat, "jpeg_bytes": len(jpeg),
                              "photo": "astronaut + mirror image, 1280x720, JPEG q90", "config": m.config}
    with tempfile.TemporaryDirectory(prefix="m2fp-e2e-") as tmp:
        scratch = Path(tmp)
        (scratch / "photo.jpg").write_bytes(jpeg)
        print("e2e: reference pipeline ...", file=sys.stderr, flush=True)
        ref = run_reference(m, scratch / "photo.jpg", args.repeat, scratch)
        ref_labels = np.load(scratch / "reference_labels.npy")
    paths = {"reference": ref}
    variants = {"ours-fp32": (m.fp32, {}), "ours-int8": (m.int8, {}),
                "ours-int8-fast": (m.int8, {"M2FP_INPUT_PROFILE": "fast"}),
                "ours-fp32-fast": (m.fp32, {"M2FP_INPUT_PROFILE": "fast"})}
    labels: dict[str, np.ndarray] = {}
    for name, (model, env) in variants.items():
        print(f"e2e: {name} ...", file=sys.stderr, flush=True)
        paths[name] = run_ours(model, jpeg, args.repeat, env)
        labels[name] = paths[name].pop("labels")
    for result in paths.values():
        result["stages"] = summarize(result.pop("runs"))
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
