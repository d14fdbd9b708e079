"""The INT8 rewrites of the graph ONNX Runtime saved after optimising an INT8 model, in one command.

``python -m m2fp_service.int8graph OPTIMISED.onnx OUT.onnx [--no-convolutions]`` runs, in this order:
``qconv.rewrite`` (the convolutions on AMX tiles; not with ``--no-convolutions``, for a CPU with AVX-512 VNNI
but no AMX, where ONNX Runtime's convolutions are faster), ``qgroupnorm.rewrite`` (the pixel decoder's group
norms), ``qdedupe.rewrite`` (DequantizeLinear copies) and ``softmax.fuse_masks`` (the masked softmaxes' repeated
masks). OUT is written when some node was replaced (nothing otherwise); how many on stdout, in words on stderr.
A rewrite that raises is reported on stderr and left out; the others still run.
The engine runs this in a child process (``engine.int8_graph_rewritten``: the graph is parsed once more, and a
rewrite's memory goes with the process) while it writes the optimised-graph cache, and opens OUT.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import onnx

from m2fp_service import qconv, qdedupe, qgroupnorm, softmax

USAGE = "usage: python -m m2fp_service.int8graph OPTIMISED.onnx OUT.onnx [--no-convolutions]"


Rewrite = Callable[[onnx.ModelProto], int]


def rewritten(path: str, rewrites: list[tuple[str, Rewrite]]) -> tuple[onnx.ModelProto, list[int]]:
    """The graph at ``path`` after each ``(name, rewrite)`` in turn, and their counts. One that raises is said on
    stderr and counts 0: the graph is read again and the rewrites before it that did not fail run again (no copy of
    the graph is kept in memory for that case: the same rewrites of the same graph give the same result)."""
    model, counts, failed = onnx.load(path), [], set()
    for k, (name, rewrite) in enumerate(rewrites):
        try:
            counts.append(rewrite(model))
        except Exception:  # noqa: BLE001 - any failure of one rewrite: the others still run
            print(f"the {name} rewrite failed and was left out:\n{traceback.format_exc()}", file=sys.stderr)
            counts.append(0)
            failed.add(k)
            model = onnx.load(path)
            for _, again in (r for i, r in enumerate(rewrites[:k]) if i not in failed):
                again(model)
    return model, counts


def main(argv: list[str] | None = None) -> int:
    """The command (see the module's docstring); 2 on wrong arguments."""
    args = sys.argv[1:] if argv is None else argv
    convolutions = "--no-convolutions" not in args
    paths = [a for a in args if a != "--no-convolutions"]
    if len(paths) != 2 or any(p.startswith("--") for p in paths):
        print(USAGE, file=sys.stderr)
        return 2
    rewrites: list[tuple[str, Rewrite]] = [("INT8 convolution", qconv.rewrite if convolutions else lambda _: 0),
                                           ("INT8 group norm", qgroupnorm.rewrite),
                                           ("DequantizeLinear copies", qdedupe.rewrite),
                                           ("softmax mask", softmax.fuse_masks)]
    model, counts = rewritten(paths[0], rewrites)
    count, norms, dropped, masks = counts
    if count or norms or dropped or masks:
        onnx.save(model, Path(paths[1]))
    print(count + norms + dropped + masks)
    print(f"graph rewrites: {count} INT8 convolution(s) on AMX tiles, {norms} INT8 group norm(s), {dropped} "
          f"DequantizeLinear node(s) computed twice or only measured dropped, {masks} softmax(es) adding their "
          "mask", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
