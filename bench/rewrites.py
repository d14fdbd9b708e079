"""The Winograd rewrite, node by node: the FP32 model as exported vs as the engine rewrites it.

One process, both sessions (the engine's settings, the kernel library registered), runs alternating
on the benchmark photo at each size, with ONNX Runtime's profiler on: the rewritten convolution's
own nodes against the convolution they replace (a node's time is far steadier than a whole run's on
a noisy machine), and the whole run. Writes ``bench/results/winograd.json``.

    python bench/winograd.py [--quick] [--rounds N]
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

    from m2fp_service.engine import session_options

    so = session_options(THREADS)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.register_custom_ops_library(str(kernel))
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


def _profile(session: Any, replaced: set[str]) -> tuple[list[float], list[float]]:
    """(seconds per run, seconds per run in the nodes named in ``replaced`` or from the rewrite)."""
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][1:]  # the first is the warm-up
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    whole, part = [], []
    for run in runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        whole.append(run["dur"] / 1e6)
        part.append(sum(e["dur"] for e in nodes if start <= e["ts"] < end
                        and ("winograd" in e["name"] or e["name"].removesuffix("_kernel_time") in replaced)) / 1e6)
    return whole, part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    import onnx

    from m2fp_service import winograd
    from m2fp_service.engine import usable_msda_kernel, winograd_graph
    from m2fp_service.imaging.preprocess import pad_to_input
    from m2fp_service.modelcard import InputPolicy

    m = models(args.quick)
    kernel = usable_msda_kernel("auto")
    graph = winograd_graph(m.fp32, kernel) if kernel is not None else None
    if graph is None:
        write_json("winograd", {"skipped": "no kernel library, or no convolution qualifies (the quick model's are "
                                           "thin)"})
        return
    rewritten = onnx.load_from_string(graph)
    produced = {o for n in rewritten.graph.node for o in n.output}
    original = onnx.load(str(m.fp32), load_external_data=False)
    # The convolutions the rewrite replaced (and the Relus it took in): nodes whose outputs it now makes.
    replaced = {n.name for n in original.graph.node if n.op_type in ("Conv", "Relu")
                and n.output[0] in produced and n.name not in {r.name for r in rewritten.graph.node}}
    # ONNX Runtime renames a convolution it fuses or converts to its own layout ("<output>_nchwc"):
    outputs = {o for n in original.graph.node if n.name in replaced for o in n.output}
    replaced |= {f"{o}_nchwc" for o in outputs}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hw in NETWORK_SIZES[:1] if args.quick else NETWORK_SIZES:
            x = pad_to_input(photo_at(hw), InputPolicy())
            plain = _session(str(m.fp32), kernel, f"{tmp}/plain")
            fast = _session(graph, kernel, f"{tmp}/fast")
            for _ in range(args.rounds + 1):
                plain.run(None, {"image": x})
                fast.run(None, {"image": x})
            plain_whole, plain_part = _profile(plain, replaced)
            fast_whole, fast_part = _profile(fast, replaced)
            rows.append({"input_hw": f"{hw[0]}x{hw[1]}", "plain_s": stats(plain_whole), "winograd_s": stats(fast_whole),
                         "plain_node_s": stats(plain_part), "winograd_node_s": stats(fast_part)})
            print(rows[-1], file=sys.stderr, flush=True)
    count = int({p.key: p.value for p in rewritten.metadata_props}[winograd.METADATA_KEY])
    write_json("winograd", {"convolutions": count, "rounds": args.rounds,
                            "replaced_nodes": sorted(replaced), "rows": rows})


if __name__ == "__main__":
    main()
