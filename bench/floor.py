"""The arithmetic floor of one 720p inference: graph FLOPs / this machine's sustained GEMM rate.

FLOPs are counted on the exported graph at the padded input size of the benchmark photo
(1280x720 -> 1138x640 resized -> 1152x640 padded): 2 * MACs of every Conv, MatMul, Gemm and
Einsum (the mask-embedding product). Tensor shapes come from ONNX shape inference with the
input fixed to (1, 3, 640, 1152); the shapes it leaves symbolic (the batch/query dimensions
behind data-dependent Reshapes in the transformer) are taken from the shapes ONNX Runtime
records in its profile of one run of the unoptimised graph at that size. GridSample
(deformable attention), Softmax, normalisation and element-wise ops are not counted; their
element counts are reported so the reader can see what the floor leaves out.

The rate is float32 with 2 threads, probed three ways on shapes like the network's (3x3 convs
as im2col GEMMs, and a square GEMM): numpy ``matmul`` (OpenBLAS), an ONNX Runtime graph holding
a single MatMul (MLAS), and one holding a single 3x3 Conv (ORT's NCHWc kernels, which run faster
than its MatMul on this CPU; most of the network's FLOPs are convolutions). The floor is a
bound, so it takes the best call of any probe; the ORT probes also run on 1 thread, and twice
that rate is reported too, as what both cores give when no other process is using them.
floor = FLOPs / rate. Our inference time is measured here with ``ParsingEngine`` (2 intra-op
threads) on the same padded tensor, and the per-op-type split of that time comes from an ONNX
Runtime profile of a session set up like the engine's.

Usage::

    python bench/floor.py --model models/m2fp-bench.onnx [--repeat 3] [--out bench/results/floor.json]
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
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from _report import emit  # noqa: E402  (bench/ is the script directory)
from onnx import helper, shape_inference  # noqa: E402

PADDED_HW = (640, 1152)  # 1280x720 photo -> short edge 640 -> 640x1138 -> padded to /32
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
    """Calls ``run`` (one warm-up) until ``seconds`` have passed; median and best GFLOP/s."""
    run()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"gflops_median": flops / statistics.median(times) / 1e9, "gflops_best": flops / min(times) / 1e9,
            "calls": len(times)}


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


def gemm_rates(seconds: float) -> list[dict[str, Any]]:
    """Sustained float32 rates: numpy matmul (OpenBLAS, 2 threads), ORT MatMul and ORT 3x3 Conv.

    The ORT probes run with 2 threads and with 1: on this shared box the second core is often
    busy with other work, and twice the 1-thread rate is what both cores would give uncontended.
    The Conv probe is there because ORT's NCHWc convolution kernels run faster than its MatMul
    on this CPU, and most of the network's FLOPs are convolutions.
    """
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for m, k, n in GEMM_SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        flops = 2.0 * m * k * n
        c = np.empty((m, n), np.float32)
        rows.append({"probe": "numpy matmul", "shape": f"{m}x{k}x{n}", "threads": THREADS,
                     **_sustained(lambda a=a, b=b, c=c: np.matmul(a, b, out=c), flops, seconds)})
        proto = _single_op_model(helper.make_node("MatMul", ["X", "W"], ["Y"]), [m, k], [m, n], b)
        for threads in (THREADS, 1):
            session = _ort_session(proto, threads)
            rows.append({"probe": "ORT MatMul", "shape": f"{m}x{k}x{n}", "threads": threads,
                         **_sustained(lambda s=session, a=a: s.run(["Y"], {"X": a}), flops, seconds)})
    for channels, (h, w) in CONV_PROBES:
        weight = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * 0.01
        x = rng.standard_normal((1, channels, h, w), dtype=np.float32)
        node = helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1])
        proto = _single_op_model(node, [1, channels, h, w], [1, channels, h, w], weight)
        flops = 2.0 * channels * channels * 9 * h * w
        for threads in (THREADS, 1):
            session = _ort_session(proto, threads)
            rows.append({"probe": "ORT Conv 3x3", "shape": f"{channels}ch {h}x{w}", "threads": threads,
                         **_sustained(lambda s=session, x=x: s.run(["Y"], {"X": x}), flops, seconds)})
    return rows


# --------------------------------------------------------------------------------------------
# Our inference time and where it goes
# --------------------------------------------------------------------------------------------


def benchmark_photo_tensor(policy: Any) -> np.ndarray:
    """The benchmark photo (see reference_vs_ours.py) prepared exactly as the service does."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference_vs_ours import make_photo

    from m2fp_service.imaging import preprocess

    tensor, meta = preprocess.prepare(make_photo(), policy)
    if tuple(meta.padded_hw) != PADDED_HW:
        raise RuntimeError(f"photo pads to {meta.padded_hw}, expected {PADDED_HW}")
    return tensor


def our_inference(model_path: Path, repeat: int) -> dict[str, Any]:
    """Median ``ParsingEngine.run`` time on the photo, and a per-op-type split from an ORT profile."""
    from m2fp_service.engine import ParsingEngine

    engine = ParsingEngine(model_path, intra_op_threads=THREADS)
    tensor = benchmark_photo_tensor(engine.card.input_policy)
    engine.run(tensor)  # warm-up at this size
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        engine.run(tensor)
        times.append(time.perf_counter() - t)
    del engine

    # Same options as the engine, plus profiling, for the split: a warm-up run, then the one used.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"m2fp-floor-opt-{os.getpid()}")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"image": tensor})
    session.run(None, {"image": tensor})
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink(missing_ok=True)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    last_start = runs[-1]["ts"]
    split: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_start:
            split[e["args"]["op_name"]] += e["dur"] / 1e6
    total = sum(split.values())
    top = sorted(split.items(), key=lambda kv: -kv[1])
    return {"infer_s_median": statistics.median(times), "infer_s_runs": times,
            "profiled_run_s": runs[-1]["dur"] / 1e6,
            "by_op_type_s": {k: round(v, 4) for k, v in top}, "kernel_total_s": total}


# --------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    f, ours = report["flops"], report["ours"]
    lines = [
        f"Input {f['input_hw'][0]}x{f['input_hw'][1]} (padded), {THREADS} threads; {report['date']}.",
        "",
        "| what | value |",
        "|---|---:|",
        f"| graph FLOPs (2 x MACs of Conv, MatMul, Gemm, Einsum) | {f['flops'] / 1e9:.1f} GFLOP |",
    ]
    lines += [f"| &nbsp;&nbsp;{op} ({v['nodes']} nodes) | {v['flops'] / 1e9:.1f} GFLOP |"
              for op, v in sorted(f["by_op"].items(), key=lambda kv: -kv[1]["flops"])]
    for key, label in (("measured_2_threads", "2 threads, best call of any probe"),
                       ("twice_1_thread", "2 x the best 1-thread call (both cores uncontended)")):
        lines += [
            f"| fp32 rate, {label} | {report['rates'][key]['gflops']:.0f} GFLOP/s "
            f"({report['rates'][key]['probe']}) |",
            f"| floor at that rate | {report['floor_s'][key]:.3f} s |",
        ]
    lines += [
        f"| ours: ParsingEngine.run, median of {len(ours['infer_s_runs'])} (best) | {ours['infer_s_median']:.3f} s "
        f"({min(ours['infer_s_runs']):.3f} s) |",
        f"| **ours (median) / floor** (2-thread rate; 2 x 1-thread rate) | "
        f"**{report['ours_over_floor']['measured_2_threads']:.2f}x**; "
        f"**{report['ours_over_floor']['twice_1_thread']:.2f}x** |",
        f"| ours achieved rate on counted FLOPs | {f['flops'] / ours['infer_s_median'] / 1e9:.1f} GFLOP/s |",
        "",
        "Rate probes (GFLOP/s, median and best of the calls in each sampling window):",
        "",
        "| probe | shape | threads | median | best |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['probe']} | {r['shape']} | {r['threads']} | {r['gflops_median']:.0f} | {r['gflops_best']:.0f} |"
              for r in report["gemm"]]
    total = ours["kernel_total_s"]
    lines += ["", f"Where ORT's time goes (one profiled run, kernels sum to {total:.3f} s):", "",
              "| op type | s | share |", "|---|---:|---:|"]
    lines += [f"| {op} | {s:.3f} | {s / total:.0%} |" for op, s in list(ours["by_op_type_s"].items())[:10]]
    lines += ["", "Not in the FLOP count (output elements at this size): " + ", ".join(
        f"{op} x{v['nodes']}: {v['output_elements'] / 1e6:.1f} M" for op, v in f["noted_not_counted"].items()) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="ONNX file written by `m2fp export`")
    parser.add_argument("--repeat", type=int, default=3, help="timed inference runs (after one warm-up)")
    parser.add_argument("--gemm-seconds", type=float, default=2.0, help="sampling window per GEMM shape")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)

    print("counting FLOPs ...", file=sys.stderr, flush=True)
    flops = count_flops(args.model, PADDED_HW)
    print("measuring GEMM rate ...", file=sys.stderr, flush=True)
    gemm = gemm_rates(args.gemm_seconds)
    # The floor is a bound, so it takes the best call of any probe: the rate this machine
    # demonstrably sustained for a whole GEMM/Conv call, least disturbed by other processes.
    two = max((r for r in gemm if r["threads"] == THREADS), key=lambda r: r["gflops_best"])
    one = max((r for r in gemm if r["threads"] == 1), key=lambda r: r["gflops_best"])
    print("timing our inference ...", file=sys.stderr, flush=True)
    ours = our_inference(args.model, args.repeat)
    rates = {
        "measured_2_threads": {"gflops": two["gflops_best"], "probe": f"{two['probe']} {two['shape']}"},
        "twice_1_thread": {"gflops": 2 * one["gflops_best"], "probe": f"{one['probe']} {one['shape']}"},
    }
    floors = {k: flops["flops"] / (v["gflops"] * 1e9) for k, v in rates.items()}
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": str(args.model), "threads": THREADS, "loadavg_1min": os.getloadavg()[0],
        "flops": flops, "gemm": gemm, "rates": rates, "floor_s": floors,
        "ours": ours, "ours_over_floor": {k: ours["infer_s_median"] / v for k, v in floors.items()},
    }
    emit(report, markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
