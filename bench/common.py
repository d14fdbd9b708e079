"""What every benchmark shares: the photo, the models, session options, machine facts, the report.

One photo for everything: scikit-image's astronaut beside her mirror image (two people, the
test suite's ``photo`` fixture and the exporter's check picture), PIL-bilinear resized to
1280x720, saved as a quality-90 JPEG for the HTTP paths. The reference's input policy turns it
into 1138x640, padded to 1152x640, on both sides.

Models come from ``models/`` (gitignored); ``ensure_models()`` exports them on first use with
the documented commands (~1 min each for the full size): the full architecture with untrained
"confident" weights (seed 0), its static INT8 quantization, and the same for the tiny config
(quick mode).
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
THREADS = 2
PHOTO_WH = (1280, 720)
PADDED_720P = (640, 1152)
NETWORK_SIZES = ((512, 512), (640, 640), (640, 1152))


# --------------------------------------------------------------------------------------------
# The photo
# --------------------------------------------------------------------------------------------


def photo_720p() -> np.ndarray:
    """(720, 1280, 3) uint8 RGB: the astronaut and her mirror image, bilinear to 1280x720."""
    from m2fp_export.images import astronaut_pair

    return np.asarray(Image.fromarray(astronaut_pair()).resize(PHOTO_WH, Image.Resampling.BILINEAR))


def photo_jpeg(quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo_720p()).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_at(hw: tuple[int, int]) -> np.ndarray:
    """The photo resized to exactly ``hw`` (network-only sizes: the tensor is this, unpadded)."""
    return np.asarray(Image.fromarray(photo_720p()).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    config: str
    fp32: Path
    int8: Path


def models(quick: bool = False) -> Models:
    config = "tiny" if quick else "cihp-r101"
    stem = "m2fp-bench-tiny" if quick else "m2fp-bench"
    return Models(config, ROOT / "models" / f"{stem}.onnx", ROOT / "models" / f"{stem}-int8.onnx")


def ensure_models(m: Models, log: Any = print) -> None:
    """Exports the benchmark models if missing (the commands bench/README.md documents)."""
    m2fp = [sys.executable, "-m", "m2fp_service.cli", "export"]
    from m2fp_service.engine import usable_msda_kernel

    # Models exported before the fused node existed (an INT8 model only has it if the kernel was built).
    for path in (m.fp32, m.int8) if usable_msda_kernel("auto") else (m.fp32,):
        if path.is_file() and "msda_op" not in _card(path).exporter:
            log(f"{path} predates the fused deformable-attention node: exporting it again")
            path.unlink()
            m.int8.unlink(missing_ok=True)
    preset = _card(m.int8).exporter.get("quantization", {}).get("preset", {}) if m.int8.is_file() else {}
    if m.int8.is_file() and ("float_outputs" not in preset or "fallback_keep_fp32" not in preset):
        log(f"{m.int8} predates float MatMul outputs or quantized attention projections: quantizing it again")
        m.int8.unlink()
    if not m.fp32.is_file():
        log(f"exporting {m.fp32} (untrained confident weights, seed 0)...")
        subprocess.run([*m2fp, "--random-init", "--confident", "--seed", "0", "--config", m.config,
                        "-o", str(m.fp32)], check=True)
    if not m.int8.is_file():
        # --min-agreement 0: untrained weights give noise-like label maps on which INT8 cannot reach the
        # exporter's 99% bar; the benchmark measures speed and reports the agreement it measures itself.
        log(f"quantizing {m.int8} (static INT8, built-in calibration set)...")
        subprocess.run([*m2fp, "--int8", "--from-onnx", str(m.fp32), "--min-agreement", "0", "-o", str(m.int8)],
                       check=True)


def _card(path: Path) -> Any:
    from m2fp_service.engine import read_card

    return read_card(path)


# --------------------------------------------------------------------------------------------
# ONNX Runtime session options: the engine's, so benchmarks measure what the service runs
# --------------------------------------------------------------------------------------------


def engine(model: Path, profile: str | None = None, msda_kernel: str = "auto") -> Any:
    """The service's ``ParsingEngine`` on ``model`` with ``THREADS`` threads (its own options)."""
    from m2fp_service.engine import EngineOptions, ParsingEngine

    return ParsingEngine(model, options=EngineOptions(intra_op_threads=THREADS, input_profile=profile,
                                                      msda_kernel=msda_kernel))


# --------------------------------------------------------------------------------------------
# Machine facts and noise
# --------------------------------------------------------------------------------------------

_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                      "amx_int8", "amx_bf16", "f16c")


def machine() -> dict[str, Any]:
    """CPU model, cores, the instruction-set flags that matter here, memory, library versions."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    from importlib import metadata

    versions = {}  # from the installed metadata: importing locust would monkey-patch this process (gevent)
    for name in ("onnxruntime", "torch", "modelscope", "numpy", "opencv-contrib-python-headless", "pillow",
                 "pyperf", "pytest-benchmark", "locust"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import psutil

    return {
        "cpu_model": fields.get("model name", platform.processor() or "unknown"),
        "cores": os.cpu_count(),
        "flags": [f for f in _FLAGS_OF_INTEREST if f in flags],
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "packages": versions,
    }


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class BusyMeter:
    """How many cores processes *other than ours* kept busy over an interval (from /proc/stat)."""

    def __init__(self, own_pids: Iterable[int] = ()) -> None:
        self.own = list(own_pids)
        self._t0 = time.perf_counter()
        self._busy0 = _busy_seconds()
        self._own0 = self._own_seconds()

    def _own_seconds(self) -> float:
        import psutil

        total = 0.0
        for pid in [os.getpid(), *self.own]:
            try:
                p = psutil.Process(pid)
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    def other_cores(self) -> float:
        wall = time.perf_counter() - self._t0
        others = (_busy_seconds() - self._busy0) - (self._own_seconds() - self._own0)
        return round(max(others, 0.0) / max(wall, 1e-9), 2)


def _busy_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> bool:
    """Starts the process's peak RSS (VmHWM) afresh from its current RSS (Linux: clear_refs 5); False
    when the kernel or permissions do not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb(pid: int | None = None) -> float:
    """The process's peak resident set size (VmHWM) in MB."""
    path = Path(f"/proc/{pid or 'self'}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmHWM in {path}")


# --------------------------------------------------------------------------------------------
# Statistics and the report
# --------------------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, float]:
    """median, min, max and n of a list of measurements."""
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "n": len(values)}


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Writes ``bench/results/<name>.json`` (raw results; gitignored)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def emit(report: dict[str, Any], markdown: Callable[[dict[str, Any]], str], out: Path | None) -> None:
    """The tail of a one-off study (``bench/studies``): adds ``report["markdown"]``, prints it, and writes the
    whole report as JSON to ``out``."""
    report["markdown"] = markdown(report)
    print(report["markdown"])
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out}", file=sys.stderr)


def read_json(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value)}")


def fmt_s(s: dict[str, float], digits: int = 2) -> str:
    """'median (min–max)' of a stats() dict, in seconds."""
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"
