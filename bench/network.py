"""Network only, cross-process: PyTorch eager vs ONNX Runtime FP32 vs ONNX Runtime INT8 (pyperf).

Each (engine, input size) is one pyperf benchmark: pyperf runs it in fresh worker processes
(``--processes``), each warming up once and timing ``--values`` runs, and records each worker's
peak RSS (``mem_max_rss``). The input is the benchmark photo resized to exactly the size (no
padding needed: every size is a multiple of 32).

- ``torch``: ModelScope's M2FP built by ``random_init(config, seed 0, confident)``, the exported
  graph's forward (normalise, backbone, pixel decoder, decoder) in eager mode, 2 threads.
- ``ort-fp32`` / ``ort-int8``: the service's ``ParsingEngine.run`` on the exported models (with the
  fused deformable-attention kernel, ``make native``, as the service runs them).
- ``ort-fp32-std`` / ``ort-int8-std``: the same with the custom-op library off (``msda_kernel="off"``):
  the ``ai.m2fp::MSDeformAttn`` nodes run as their ONNX function's standard ops, and the graph as
  exported (no Winograd convolution, no fused feed-forward blocks).
- Session tuning at 512x512 (``--tuning``): the engine's settings (all graph optimisations,
  idle threads sleep, the arena kept while the input size repeats, the pixel decoder's 3x3 convolution as
  Winograd F(4x4, 3x3), the feed-forward blocks fused) against one change each: spinning threads,
  basic graph optimisations only, the memory arena off, the graph as exported (no graph rewrites).

Usage (``make bench`` runs it)::

    python bench/network.py -o bench/results/network.json --processes 2 --values 2 [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pyperf  # noqa: E402
from common import NETWORK_SIZES, RESULTS, THREADS, models, photo_at  # noqa: E402

CPU_LOG = RESULTS / "network-cpu.jsonl"

_cache: dict[str, Any] = {}


def _tensor(hw: tuple[int, int]) -> Any:
    from m2fp_service.imaging.preprocess import pad_to_input
    from m2fp_service.modelcard import InputPolicy

    return pad_to_input(photo_at(hw), InputPolicy())


def _torch_run(config: str) -> Any:
    if "torch" not in _cache:
        import torch

        torch.set_num_threads(THREADS)
        from m2fp_export.convert import M2FPOnnxWrapper
        from m2fp_export.source import random_init

        _cache["torch"] = (torch, M2FPOnnxWrapper(random_init(config, seed=0, confident=True).model).eval())
    torch, wrapper = _cache["torch"]

    def run(x: Any) -> None:
        with torch.no_grad():
            wrapper(torch.from_numpy(x))

    return run


def _ort_run(model: Path, msda_kernel: str = "auto") -> Any:
    key = f"{model}|{msda_kernel}"
    if key not in _cache:
        from common import engine

        _cache[key] = engine(model, msda_kernel=msda_kernel)
    return _cache[key].run


def _tuned_run(model: Path, variant: str) -> Any:
    """An ORT session like the engine's with one setting changed (``variant``)."""
    if variant not in _cache:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if variant == "basic-opt"
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if variant == "spinning" else "0")
        so.enable_cpu_mem_arena = variant != "no-arena"
        from m2fp_service.engine import DISABLED_OPTIMIZERS, rewritten_graph, usable_msda_kernel

        kernel = usable_msda_kernel("auto")  # as the engine runs it
        if kernel is not None:
            so.register_custom_ops_library(str(kernel))
        graph = None if variant == "no-rewrites" else rewritten_graph(model, kernel)
        session = ort.InferenceSession(str(model) if graph is None else graph, so, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(DISABLED_OPTIMIZERS))
        _cache[variant] = lambda x: session.run(None, {"image": x})
    return _cache[variant]


def bench(loops: int, kind: str, hw: tuple[int, int], quick: bool) -> float:
    m = models(quick)
    if kind == "torch":
        run = _torch_run(m.config)
    elif kind.startswith("tuning-"):
        run = _tuned_run(m.fp32, kind.removeprefix("tuning-"))
    else:
        run = _ort_run(m.int8 if kind.startswith("ort-int8") else m.fp32, "off" if kind.endswith("-std") else "auto")
    x = _tensor(hw)
    t0, c0 = pyperf.perf_counter(), time.process_time()
    for _ in range(loops):
        run(x)
    wall, cpu = pyperf.perf_counter() - t0, time.process_time() - c0
    # pyperf keeps one value per run (wall time); the CPU time of the same calls goes beside it.
    with CPU_LOG.open("a") as fh:
        fh.write(json.dumps({"kind": kind, "input_hw": f"{hw[0]}x{hw[1]}", "pid": os.getpid(),
                             "wall_s": wall / loops, "cpu_s": cpu / loops}) + "\n")
    return wall


def _worker_args(cmd: list[str], args: Any) -> None:
    """pyperf starts workers with its own options only; ours must be passed on."""
    if args.quick:
        cmd.append("--quick")
    if args.tuning:
        cmd.append("--tuning")
    cmd.extend(["--kinds", args.kinds])


def main() -> None:
    runner = pyperf.Runner(values=2, processes=2, warmups=1, loops=1, add_cmdline_args=_worker_args)
    runner.argparser.add_argument("--quick", action="store_true", help="tiny model, 512x512 only")
    runner.argparser.add_argument("--kinds", default="torch,ort-fp32,ort-int8,ort-fp32-std,ort-int8-std")
    runner.argparser.add_argument("--tuning", action="store_true", help="also the session-option variants at 640x640")
    args = runner.parse_args()
    sizes = NETWORK_SIZES[:1] if args.quick else NETWORK_SIZES
    for hw in sizes:
        for kind in args.kinds.split(","):
            runner.bench_time_func(f"network {kind} {hw[0]}x{hw[1]}", bench, kind, hw, args.quick,
                                   metadata={"kind": kind, "input_hw": f"{hw[0]}x{hw[1]}"})
    if args.tuning:
        hw = (512, 512)
        for variant in ("spinning", "basic-opt", "no-arena", "no-rewrites"):
            kind = f"tuning-{variant}"
            runner.bench_time_func(f"network {kind} {hw[0]}x{hw[1]}", bench, kind, hw, args.quick,
                                   metadata={"kind": kind, "input_hw": f"{hw[0]}x{hw[1]}"})


if __name__ == "__main__":
    main()
