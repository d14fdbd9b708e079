"""The arithmetic floor: graph FLOPs per input size / this machine's measured GEMM/conv rates.

FLOPs are counted on the exported FP32 graph at each network-benchmark size: 2 * MACs of every
Conv, MatMul, Gemm and Einsum. Tensor shapes come from ONNX shape inference with the input fixed
to (1, 3, H, W); the shapes it leaves symbolic (the batch/query dimensions behind data-dependent
Reshapes in the transformers) are taken from ONNX Runtime's profile of one unoptimised run at
that size. GridSample (deformable attention), Softmax, normalisation and element-wise ops are not
counted; their output element counts are reported so the reader sees what the floor leaves out.

The rates are measured in the same run, on shapes like the network's, with 2 threads (and 1,
for reference): float32 through numpy ``matmul`` (OpenBLAS), an ONNX Runtime graph holding one
MatMul (MLAS) and one holding one 3x3 Conv (NCHWc kernels); int8 through the same single-op
graphs quantized statically (QDQ, per-channel weights, fused by ONNX Runtime into integer
kernels). Each floor uses the best call of any probe of its kind: floor = FLOPs / rate.

This machine's speed drifts by 20-40% within minutes (a shared VM), so a floor measured now and a
network timed minutes later give a ratio that moves with the drift. The interleaved measurement
takes both under the same conditions: in one process, each round times the probe that set the
floor (FP32, then INT8), one network run of the service's engine in FP32 and one in INT8, and the
probes again; each round's ratio uses that round's best probe call. Its median over the rounds is
the ratio the targets are judged by.

Usage (``make bench`` runs it)::

    python bench/floor.py [--quick] [--seconds 1.5] [--rounds 9]
"""

from __future__ import annotations

import os

THREADS = 2
# OpenBLAS reads its thread count when numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import helper, shape_inference  # noqa: E402

COUNTED = ("Conv", "MatMul", "Gemm", "Einsum")
NOTED = ("GridSample", "Softmax", "LayerNormalization", "InstanceNormalization", "Resize")
# (M, K, N) for the rate: a res4 3x3 conv as im2col (40x72 output pixels at 1/16 of the padded
# input, 3x3x256 -> 256), a 1/8-scale 3x3x128 -> 128 conv, and a square 2048 GEMM.
GEMM_SHAPES = ((2880, 2304, 256), (11520, 1152, 128), (2048, 2048, 2048))
# (channels, (H, W)) for 3x3 Conv probes: the pixel decoder's 1/4-scale output conv and a res4 conv.
CONV_PROBES = ((256, (160, 288)), (256, (40, 72)))


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def _dims(value_info: onnx.ValueInfoProto) -> list[int] | None:
    dims = value_info.type.tensor_type.shape.dim
    out = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return out if out and all(v > 0 for v in out) else None


def shapes_from_onnx(model: onnx.ModelProto, hw: tuple[int, int]) -> dict[str, list[int]]:
    """Fully known tensor shapes from ONNX shape inference with a fixed (1, 3, H, W) input."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (1, 3, *hw), strict=True):
        d.ClearField("dim_param")
        d.dim_value = v
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    shapes = {i.name: list(i.dims) for i in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        d = _dims(vi)
        if d is not None:
            shapes[vi.name] = d
    return shapes


def shapes_from_ort_profile(model_path: Path, hw: tuple[int, int]) -> dict[str, list[list[int]]]:
    """Per node: the input and output shapes ONNX Runtime saw in one unoptimised run.

    Returns:
        node name -> [input shapes..., output shapes...] as recorded (empty inputs skipped).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"m2fp-floor-{os.getpid()}")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: np.zeros((1, 3, *hw), np.float32)})
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink(missing_ok=True)
    out = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            args = e["args"]
            shapes = [next(iter(s.values())) for s in (*args.get("input_type_shape", []),
                                                        *args.get("output_type_shape", []))]
            out[e["name"][: -len("_kernel_time")]] = shapes
    return out


def _from_profile(node: onnx.NodeProto, inputs: list[str], recorded: list[list[int]],
                  static: dict[str, list[int]], initializers: set[str]) -> list[list[int]]:
    """[input shapes..., first output shape] of a node from its ORT profile entry.

    The profile lists the inputs ORT still held, then the outputs; weights that ORT pre-packed
    (MatMul's B) may be missing from the inputs, and their shapes come from the initializers.
    """
    recorded_inputs, outputs = recorded[: len(recorded) - len(node.output)], recorded[-len(node.output):]
    if len(recorded_inputs) == len(inputs):
        shapes = list(recorded_inputs)
    else:
        dynamic = [n for n in inputs if n not in initializers]
        if len(recorded_inputs) != len(dynamic):
            raise RuntimeError(f"cannot match the profiled inputs of {node.name}: {recorded}")
        it = iter(recorded_inputs)
        shapes = [static[n] if n in initializers else next(it) for n in inputs]
    return [*shapes, outputs[0]]


def node_macs(node: onnx.NodeProto, ins: list[list[int]], out: list[int]) -> int:
    """Multiply-accumulates of one Conv / MatMul / Gemm / Einsum from its input and output shapes."""
    if node.op_type == "Conv":
        weight = ins[1]  # (Cout, Cin/groups, kh, kw)
        return int(np.prod(out, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
    if node.op_type == "MatMul":
        return int(np.prod(out, dtype=np.int64) * ins[0][-1])
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        k = ins[0][0] if trans_a else ins[0][1]
        return int(np.prod(out, dtype=np.int64) * k)
    if node.op_type == "Einsum":
        equation = next(a.s.decode() for a in node.attribute if a.name == "equation").replace(" ", "")
        terms = equation.split("->")[0].split(",")
        sizes: dict[str, int] = {}
        for term, shape in zip(terms, ins, strict=True):
            for letter, size in zip(term, shape, strict=True):
                sizes[letter] = max(sizes.get(letter, 1), size)
        return int(np.prod(list(sizes.values()), dtype=np.int64))
    raise ValueError(node.op_type)


def count_flops(model_path: Path, hw: tuple[int, int]) -> dict[str, Any]:
    """2 * MACs per counted op type at input size ``hw``, and the element counts of the rest.

    Returns:
        A dict with ``flops`` (total), ``by_op`` (flops and node count per op type), ``noted``
        (output elements of GridSample and other uncounted heavy ops), and how many counted
        nodes had their shapes from ONNX shape inference vs the ORT profile.
    """
    model = onnx.load(str(model_path))
    static = shapes_from_onnx(model, hw)
    profiled: dict[str, list[list[int]]] | None = None
    by_op: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"flops": 0.0, "nodes": 0})
    noted: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"output_elements": 0.0, "nodes": 0})
    source: collections.Counter[str] = collections.Counter()
    initializers = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in COUNTED + NOTED:
            continue
        inputs = [n for n in node.input if n]
        shapes = [static.get(n) for n in (*inputs, node.output[0])]
        if all(s is not None for s in shapes):
            source["onnx_shape_inference"] += 1
        else:
            if profiled is None:
                profiled = shapes_from_ort_profile(model_path, hw)
            if node.name not in profiled:
                raise RuntimeError(f"no shapes for {node.op_type} node {node.name}")
            shapes = _from_profile(node, inputs, profiled[node.name], static, initializers)
            source["ort_profile"] += 1
        if node.op_type in COUNTED:
            by_op[node.op_type]["flops"] += 2.0 * node_macs(node, shapes[:-1], shapes[-1])
            by_op[node.op_type]["nodes"] += 1
        else:
            noted[node.op_type]["output_elements"] += float(np.prod(shapes[-1], dtype=np.int64))
            noted[node.op_type]["nodes"] += 1
    total = sum(v["flops"] for v in by_op.values())
    return {"input_hw": list(hw), "flops": total, "by_op": dict(by_op), "noted_not_counted": dict(noted),
            "shapes_from": dict(source)}


# --------------------------------------------------------------------------------------------
# GEMM rate
# --------------------------------------------------------------------------------------------


def _sustained(run: Any, flops: float, seconds: float) -> dict[str, float]:
    """Calls ``run`` (one warm-up) until ``seconds`` have passed.

    Returns median and best GFLOP/s of wall time, and the best GFLOP per CPU-second (this
    process's CPU time over all threads): the work rate, which other processes' load on a shared
    machine disturbs far less than wall time.
    """
    run()
    times, cpus = [], []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t, c = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"gflops_median": flops / statistics.median(times) / 1e9, "gflops_best": flops / min(times) / 1e9,
            "gflops_per_cpu_s_best": flops / max(min(cpus), 1e-9) / 1e9, "calls": len(times)}


def _ort_session(proto: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _single_op_model(
    node: onnx.NodeProto, x_shape: list[int], y_shape: list[int], weight: np.ndarray
) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, y_shape)],
        [onnx.numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _quantized(proto: onnx.ModelProto, x: np.ndarray) -> onnx.ModelProto:
    """The single-op graph statically quantized (QDQ, per-channel) the way the exporter does it."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self) -> None:
            self.items = iter([{"X": x}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, str(src))
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"WeightSymmetric": True})
        return onnx.load(str(dst))


Probe = tuple[dict[str, Any], Callable[[], Any], float]


def probes(quick: bool = False) -> list[Probe]:
    """The rate probes: (label: probe, dtype, shape, threads), a call, and the FLOPs of one call.

    float32: numpy matmul (OpenBLAS), ORT MatMul (MLAS), ORT 3x3 Conv (NCHWc), 2 threads and 1.
    int8: the same ORT MatMul and Conv graphs quantized statically (QDQ).
    """
    rng = np.random.default_rng(0)
    out: list[Probe] = []
    threads_list = (THREADS,) if quick else (THREADS, 1)
    for m, k, n in GEMM_SHAPES[:1] if quick else GEMM_SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        flops = 2.0 * m * k * n
        c = np.empty((m, n), np.float32)
        out.append(({"probe": "numpy matmul", "dtype": "fp32", "shape": f"{m}x{k}x{n}", "threads": THREADS},
                    lambda a=a, b=b, c=c: np.matmul(a, b, out=c), flops))
        proto = _single_op_model(helper.make_node("MatMul", ["X", "W"], ["Y"]), [m, k], [m, n], b)
        for dtype, p in (("fp32", proto), ("int8", _quantized(proto, a))):
            for threads in threads_list:
                session = _ort_session(p, threads)
                out.append(({"probe": "ORT MatMul", "dtype": dtype, "shape": f"{m}x{k}x{n}", "threads": threads},
                            lambda s=session, a=a: s.run(["Y"], {"X": a}), flops))
    for channels, (h, w) in CONV_PROBES[-1:] if quick else CONV_PROBES:
        weight = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * 0.01
        x = rng.standard_normal((1, channels, h, w), dtype=np.float32)
        node = helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1])
        proto = _single_op_model(node, [1, channels, h, w], [1, channels, h, w], weight)
        flops = 2.0 * channels * channels * 9 * h * w
        for dtype, p in (("fp32", proto), ("int8", _quantized(proto, x))):
            for threads in threads_list:
                session = _ort_session(p, threads)
                out.append(({"probe": "ORT Conv 3x3", "dtype": dtype, "shape": f"{channels}ch {h}x{w}",
                             "threads": threads}, lambda s=session, x=x: s.run(["Y"], {"X": x}), flops))
    return out


def rate_probes(seconds: float, probe_list: list[Probe]) -> list[dict[str, Any]]:
    """Sustained rates of every probe (GFLOP/s; int8 rows: giga integer multiply-adds x 2 per second)."""
    return [{**label, **_sustained(run, flops, seconds)} for label, run, flops in probe_list]


def best_rate(rows: list[dict[str, Any]], dtype: str, threads: int = THREADS) -> dict[str, Any]:
    """The best wall-time rate of ``threads``-thread probes, and the best rate per CPU-second of any ORT probe."""
    best = max((r for r in rows if r["dtype"] == dtype and r["threads"] == threads), key=lambda r: r["gflops_best"])
    per_cpu = max((r for r in rows if r["dtype"] == dtype and r["probe"].startswith("ORT")),
                  key=lambda r: r["gflops_per_cpu_s_best"])
    return {"gflops": best["gflops_best"], "probe": f"{best['probe']} {best['shape']}",
            "gflops_per_cpu_s": per_cpu["gflops_per_cpu_s_best"],
            "probe_per_cpu_s": f"{per_cpu['probe']} {per_cpu['shape']} ({per_cpu['threads']} thread(s))"}


def interleaved(sizes: list[tuple[int, int]], flops: dict[str, Any], probe_list: list[Probe], best: dict[str, Any],
                rounds: int, seconds: float, quick: bool) -> dict[str, Any]:
    """The network against its floor with both measured in the same moments (see the module's text).

    For each size and round: the best FP32 and INT8 probes (those that set this run's floors), one
    run of the service's engine on each model, the probes again. Returns per size the rounds'
    ratios (FP32 ÷ floor, INT8 ÷ its floor, FP32 ÷ INT8) and the times they come from.
    """
    from common import engine, models, photo_at

    from m2fp_service.imaging.preprocess import pad_to_input
    from m2fp_service.modelcard import InputPolicy

    chosen = {dtype: next((run, f) for label, run, f in probe_list
                          if f"{label['probe']} {label['shape']}" == best[dtype]["probe"]
                          and label["dtype"] == dtype and label["threads"] == THREADS)
              for dtype in ("fp32", "int8")}

    def rate(dtype: str) -> float:
        run, f = chosen[dtype]
        return _sustained(run, f, seconds)["gflops_best"]

    m = models(quick)
    engines = {"fp32": engine(m.fp32), "int8": engine(m.int8)}
    out: dict[str, Any] = {}
    for hw in sizes:
        key = f"{hw[0]}x{hw[1]}"
        gflop = flops[key]["flops"] / 1e9
        x = pad_to_input(photo_at(hw), InputPolicy())
        for e in engines.values():
            e.run(x)  # warm-up: the arena grows to this size once
        rows = []
        for _ in range(rounds):
            before = {d: rate(d) for d in chosen}
            times = {}
            for dtype, e in engines.items():
                t = time.perf_counter()
                e.run(x)
                times[dtype] = time.perf_counter() - t
            after = {d: rate(d) for d in chosen}
            rates = {d: max(before[d], after[d]) for d in chosen}
            rows.append({"fp32_s": times["fp32"], "int8_s": times["int8"], "fp32_gflops": rates["fp32"],
                         "int8_gops": rates["int8"], "fp32_vs_floor": times["fp32"] / (gflop / rates["fp32"]),
                         "int8_vs_floor": times["int8"] / (gflop / rates["int8"]),
                         "int8_speedup": times["fp32"] / times["int8"]})
            print(f"  {key}: {rows[-1]}", file=sys.stderr, flush=True)
        out[key] = {"rounds": rows, **{k: statistics.median(r[k] for r in rows) for k in
                                       ("fp32_vs_floor", "int8_vs_floor", "int8_speedup")}}
    return out


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import NETWORK_SIZES, loadavg, models, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 512x512, fewer probes")
    parser.add_argument("--seconds", type=float, default=1.5, help="sampling window per rate probe")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per size (0: none)")
    args = parser.parse_args(argv)
    model = models(args.quick).fp32
    sizes = NETWORK_SIZES[:1] if args.quick else NETWORK_SIZES
    load_before = loadavg()
    print("measuring rates ...", file=sys.stderr, flush=True)
    probe_list = probes(args.quick)
    rates = rate_probes(args.seconds, probe_list)
    flops = {}
    for hw in sizes:
        print(f"counting FLOPs at {hw[0]}x{hw[1]} ...", file=sys.stderr, flush=True)
        flops[f"{hw[0]}x{hw[1]}"] = count_flops(model, hw)
    best = {"fp32": best_rate(rates, "fp32"), "int8": best_rate(rates, "int8")}
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": str(model), "threads": THREADS, "loadavg_before": load_before,
        "rates": rates, "best": best, "flops": flops,
    }
    if args.rounds:
        print("the network against its floor, interleaved ...", file=sys.stderr, flush=True)
        report["interleaved"] = interleaved(sizes, flops, probe_list, best, args.rounds, min(args.seconds, 0.5),
                                            args.quick)
    report["loadavg_after"] = loadavg()
    path = write_json("floor", report)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
