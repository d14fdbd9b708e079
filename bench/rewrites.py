"""The graph rewrites, node by node: the FP32 model as exported vs as the engine rewrites it.

One process, both sessions (the engine's settings, the kernel library registered), runs alternating
on the benchmark photo at each size, with ONNX Runtime's profiler on. For each rewrite, the nodes it
replaced (as exported) against the nodes it put in their place (a node's time is far steadier than
a whole run's on a noisy machine), and the whole run:

- Winograd: the 3x3 convolutions (and the Relus taken in) against the transforms, products and
  concatenations (``m2fp_service.winograd``), with every layout reorder of both graphs;
- feed-forward: each fused block's MatMul, Add, Relu, MatMul, Add against its ``FeedForward`` node
  (``m2fp_service.feedforward``);
- linear: each fused layer's MatMul and Add against its ``Linear`` node (the same module). Where ONNX
  Runtime fuses an exported MatMul with a Transpose (the first encoder layer's value projection,
  input transposed) the fused node has another name and is not counted as exported;
- softmax: the masked attention's ``Softmax`` nodes against the library's (``m2fp_service.softmax``).

Writes ``bench/results/rewrites.json``.

    python bench/rewrites.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import NETWORK_SIZES, THREADS, models, photo_at, stats, write_json  # noqa: E402


def _session(graph: bytes | str, kernel: Path, prefix: str) -> Any:
    import onnxruntime as ort

    from m2fp_service.engine import DISABLED_OPTIMIZERS, session_options

    so = session_options(THREADS)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.register_custom_ops_library(str(kernel))
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))  # as the engine


def _profile(session: Any, parts: dict[str, Any]) -> tuple[list[float], dict[str, list[float]]]:
    """(seconds per run, {part: seconds per run in the nodes ``parts[part]`` picks by name and op type})."""
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][1:]  # the first is the warm-up
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    whole, part = [], {name: [] for name in parts}
    for run in runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        whole.append(run["dur"] / 1e6)
        inside = [e for e in nodes if start <= e["ts"] < end]
        for name, pick in parts.items():
            part[name].append(sum(e["dur"] for e in inside
                                  if pick(e["name"].removesuffix("_kernel_time"), e["args"]["op_name"])) / 1e6)
    return whole, part


def replaced_nodes(original: Any, rewritten: Any) -> dict[str, set[str]]:
    """The names of the exported graph's nodes each rewrite replaced (and the names ONNX Runtime
    gives a convolution it converts to its own layout, "<output>_nchwc")."""
    import onnx

    from m2fp_service import feedforward

    kept = {n.name for n in rewritten.graph.node}
    ffn = {n.name for block in feedforward.blocks(original.graph) for n in block.nodes}
    rest = onnx.ModelProto()
    rest.CopyFrom(original)
    feedforward.rewrite(rest)  # the linear layers are those left after it (as in rewrite.apply)
    linear = {n.name for block in feedforward.blocks(rest.graph, feedforward.match_linear) for n in block.nodes}
    produced = {o for n in rewritten.graph.node for o in n.output}
    # The convolutions the Winograd rewrite replaced (and the Relus it took in): their outputs are still made.
    conv = {n.name for n in original.graph.node if n.op_type in ("Conv", "Relu") and n.output[0] in produced
            and n.name not in kept and n.name not in ffn | linear}
    conv |= {f"{o}_nchwc" for n in original.graph.node if n.name in conv for o in n.output}
    swapped = {n.name.removesuffix("_softmax") for n in rewritten.graph.node
               if n.op_type == "Softmax" and n.domain == feedforward.DOMAIN}
    return {"winograd": conv, "feedforward": ffn, "linear": linear, "softmax": swapped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    import onnx

    from m2fp_service import feedforward, softmax, winograd
    from m2fp_service.engine import rewritten_graph, usable_msda_kernel
    from m2fp_service.imaging.preprocess import pad_to_input
    from m2fp_service.modelcard import InputPolicy

    m = models(args.quick)
    kernel = usable_msda_kernel("auto")
    graph = rewritten_graph(m.fp32, kernel) if kernel is not None else None
    if graph is None:
        write_json("rewrites", {"skipped": "no kernel library, or nothing qualifies"})
        return
    rewritten = onnx.load_from_string(graph)
    original = onnx.load(str(m.fp32), load_external_data=False)
    replaced = replaced_nodes(original, rewritten)
    old = {kind: (lambda name, op, names=names: name in names) for kind, names in replaced.items()}
    # ONNX Runtime reorders a tensor into and out of its own layout around each Winograd convolution of a
    # residual block: every reorder, as exported and rewritten, counts with Winograd's nodes.
    old["winograd"] = lambda name, op, names=replaced["winograd"]: name in names or op.startswith("Reorder")
    new = {"winograd": lambda name, op: "winograd" in name or op.startswith("Reorder"),
           "feedforward": lambda name, op: op == "FeedForward",
           "linear": lambda name, op: op == "Linear", "softmax": lambda name, op: name.endswith("_softmax")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hw in NETWORK_SIZES[:1] if args.quick else NETWORK_SIZES:
            x = pad_to_input(photo_at(hw), InputPolicy())
            plain = _session(str(m.fp32), kernel, f"{tmp}/plain")
            fast = _session(graph, kernel, f"{tmp}/fast")
            for _ in range(args.rounds + 1):
                plain.run(None, {"image": x})
                fast.run(None, {"image": x})
            plain_whole, plain_part = _profile(plain, old)
            fast_whole, fast_part = _profile(fast, new)
            rows.append({"input_hw": f"{hw[0]}x{hw[1]}", "plain_s": stats(plain_whole),
                         "rewritten_s": stats(fast_whole),
                         **{f"{kind}_plain_node_s": stats(plain_part[kind]) for kind in old},
                         **{f"{kind}_rewritten_node_s": stats(fast_part[kind]) for kind in new}})
            print(rows[-1], file=sys.stderr, flush=True)
    meta = {p.key: p.value for p in rewritten.metadata_props}
    write_json("rewrites", {"counts": {"winograd": int(meta.get(winograd.METADATA_KEY, 0)),
                                       "feedforward": int(meta.get(feedforward.METADATA_KEY, 0)),
                                       "linear": int(meta.get(feedforward.LINEAR_METADATA_KEY, 0)),
                                       "softmax": int(meta.get(softmax.METADATA_KEY, 0))},
                            "rounds": args.rounds, "replaced_nodes": {k: sorted(v) for k, v in replaced.items()},
                            "rows": rows})


if __name__ == "__main__":
    main()
