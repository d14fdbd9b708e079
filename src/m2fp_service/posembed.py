"""Mask2Former's sine position embeddings as ``ai.m2fp::SinePositionEmbedding`` of the custom-op library.

M2FP computes DETR's sine position embedding of a feature map six times per run (the pixel decoder's three
levels, then the transformer decoder's): ~100 exported nodes each (CumSum, Div, Pow, Sin, Cos, Slice, Stack,
Concat, Transpose...) that compute and move the whole (N, H, W, 256) tensor several times, though each value
depends on one coordinate only: 0.03-0.04 s per run at 640x1152 on session 23's machine. The library's op
(``native/m2fp_posembed.cc``) computes the 256 (H + W) sines and cosines and fills the output.

``rewrite`` takes each ``Transpose`` named ``.../pe_layer[_k]/Transpose`` (the module's last node in
ModelScope's export) and the nodes its output depends on, up to the ``Shape`` nodes that read the feature map
and to constants. It rewrites one only when that subgraph reads no tensor of the graph but for the shape of
exactly one, and when the subgraph, run by ONNX's reference evaluator on zeros of two small sizes, gives the op's
results (within 1e-5, for F = half the output's channels, temperature 10000, scale 2 pi, normalised or not):
nothing is matched by its nodes' types, the function is proved on the spot. The nodes left unread then leave
the graph. Only ``onnx`` (and numpy) is used here; the engine applies it with the other rewrites
(``rewrite.py``).
"""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from m2fp_service import feedforward

METADATA_KEY = "m2fp_posembed"  # how many position embeddings were replaced (kept in the optimised graph)
SCOPE = re.compile(r"^(.*/pe_layer(?:_\d+)?)/")  # the module's nodes in ModelScope's export
# The reference evaluator's sizes (N, C, H, W): odd, unequal, one a batch of 2.
PROOF_SHAPES = ((1, 3, 5, 7), (2, 3, 6, 4))
CANDIDATES = ((10000.0, 2 * math.pi, True), (10000.0, 2 * math.pi, False))
TOLERANCE = 1e-5


def sine_embedding(n: int, h: int, w: int, feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi,
                   normalize: bool = True) -> np.ndarray:
    """(n, 2 feats, h, w) float32: PositionEmbeddingSine(feats, temperature, normalize, scale) of an (n, ., h, w)
    feature map without a mask, in float32 as PyTorch computes it (sines and cosines in float64, rounded once)."""
    k = np.arange(feats, dtype=np.float32)
    d = np.float32(temperature) ** (2 * (k // 2) / np.float32(feats))

    def axis(size: int) -> np.ndarray:  # (size, feats)
        e = np.arange(1, size + 1, dtype=np.float32)
        if normalize:
            e = e / (np.float32(size) + np.float32(1e-6)) * np.float32(scale)
        angle = (e[:, None] / d).astype(np.float64)
        return np.where(np.arange(feats) % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)

    ys, xs = axis(h), axis(w)
    pos = np.concatenate([np.broadcast_to(ys[:, None, :], (h, w, feats)),
                          np.broadcast_to(xs[None, :, :], (h, w, feats))], axis=2).transpose(2, 0, 1)
    return np.ascontiguousarray(np.broadcast_to(pos, (n, *pos.shape)))


def _subgraph(graph: onnx.GraphProto, g: feedforward.GraphIndex, out: str) -> tuple[list[onnx.NodeProto], str] | None:
    """The nodes ``out`` depends on, up to constants and the ``Shape`` nodes that read a tensor of the graph, and
    that one tensor; None when it reads more than one tensor's shape, or a graph input's or a tensor's values."""
    nodes: dict[int, onnx.NodeProto] = {}
    shapes_of: set[str] = set()
    stack = [out]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or not name or name in g.init:
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is None:  # a graph input's values
            return None
        nodes[id(node)] = node
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
            shapes_of.add(node.input[0])
            continue
        if any(a.HasField("g") or a.graphs for a in node.attribute):  # no subgraphs (If, Loop)
            return None
        stack.extend(node.input)
    produced = {o for n in nodes.values() for o in n.output}
    # A Shape of a tensor the subgraph makes itself is part of its function; the others read the graph's.
    sources = shapes_of - produced
    if len(sources) != 1:
        return None
    order = {id(n): i for i, n in enumerate(graph.node)}
    return sorted(nodes.values(), key=lambda n: order[id(n)]), sources.pop()


def _proved(model: onnx.ModelProto, nodes: list[onnx.NodeProto], source: str, out: str,
            g: feedforward.GraphIndex) -> tuple[int, float, float, bool, bool] | None:
    """(F, temperature, scale, normalize, channels_last) when the subgraph computes the sine embedding of
    ``source``'s shape (channels first, or last) at every size of ``PROOF_SHAPES``; else None."""
    from onnx.reference import ReferenceEvaluator

    read = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "position_embedding",
        [helper.make_tensor_value_info(source, onnx.TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [helper.make_tensor_value_info(out, onnx.TensorProto.UNDEFINED, None)],
        [g.init[name] for name in sorted(read & set(g.init))])
    sub = helper.make_model(graph, opset_imports=[o for o in model.opset_import if o.domain in ("", "ai.onnx")],
                            ir_version=model.ir_version)
    try:
        evaluator = ReferenceEvaluator(sub)
        results = [(shape, np.asarray(evaluator.run(None, {source: np.zeros(shape, np.float32)})[0]))  # type: ignore[index]
                   for shape in PROOF_SHAPES]
    except Exception:  # noqa: BLE001 - an op the evaluator lacks, a shape it refuses: then not proved
        return None
    for channels_last in (False, True):
        channels = {r.shape[3 if channels_last else 1] if r.ndim == 4 else -1 for _, r in results}
        if len(channels) != 1 or (c := channels.pop()) < 2 or c % 2:
            continue
        for temperature, scale, normalize in CANDIDATES:
            if all(r.dtype == np.float32 and _close(r, sine_embedding(s[0], s[2], s[3], c // 2, temperature, scale,
                                                                      normalize), channels_last)
                   for s, r in results):
                return c // 2, temperature, scale, normalize, channels_last
    return None


def _close(got: np.ndarray, want: np.ndarray, channels_last: bool) -> bool:
    want = want.transpose(0, 2, 3, 1) if channels_last else want
    return got.shape == want.shape and float(np.abs(got - want).max()) <= TOLERANCE


def _scope_outputs(graph: onnx.GraphProto, g: feedforward.GraphIndex) -> list[tuple[str, str]]:
    """(scope, tensor) for the tensors that the nodes of a ``.../pe_layer[_k]`` scope make (constants aside) and
    something outside the scope reads, or that are graph outputs: the module's result after its ``Transpose``,
    and where ONNX Runtime's optimiser has been at the graph (an INT8 model's), the tensor before it too, whose
    shape later nodes read."""
    scopes: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if (m := SCOPE.match(node.name)) is not None:
            scopes.setdefault(m.group(1), []).append(node)
    outputs = {o.name for o in graph.output}
    found = []
    for scope, nodes in scopes.items():
        inside = {id(n) for n in nodes}
        found += [(scope, o) for n in nodes if n.op_type != "Constant" for o in n.output
                  if o in outputs or any(id(r) not in inside for r in g.readers.get(o, []))]
    return found


def rewrite(model: onnx.ModelProto) -> int:
    """Replaces ``model``'s proved sine position embeddings in place (main graph only); returns how many."""
    g = feedforward.GraphIndex(model.graph)
    proved: dict[str, tuple[str, list[onnx.NodeProto], str, tuple[int, float, float, bool, bool]]] = {}
    for scope, out in _scope_outputs(model.graph, g):
        found = _subgraph(model.graph, g, out)
        params = None if found is None else _proved(model, found[0], found[1], out, g)
        if found is not None and params is not None:
            proved[out] = (scope, found[0], found[1], params)
    done: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    for out, (scope, nodes, source, params) in proved.items():
        # One computed from another proved embedding (the Transpose after the tensor whose shape later nodes
        # read) is left to read the op's result: replacing it would leave the other's nodes alive for that.
        if any(other != out and g.producer[other] in nodes for other in proved):
            continue
        feats, temperature, scale, normalize, channels_last = params
        name = scope + "/SinePositionEmbedding"
        constant = numpy_helper.from_array(
            np.array([feats, temperature, scale, float(normalize), float(channels_last)], np.float32), name + "_params")
        model.graph.initializer.append(constant)
        done.append((helper.make_node("SinePositionEmbedding", [source, constant.name], [out], name=name,
                                      domain=feedforward.DOMAIN), nodes))
    if not done:
        return 0
    new_for = {id(nodes[-1]): node for node, nodes in done}  # each op where its embedding's last node was
    replaced = {id(n) for _, nodes in done for n in nodes} - set(new_for)
    kept = [new_for.get(id(n), n) for n in model.graph.node]
    while True:  # the replaced nodes nothing reads any more leave; those still read (shared sizes) stay
        read = feedforward.names_read(kept) | {o.name for o in model.graph.output}
        unread = {id(n) for n in kept if id(n) in replaced and not set(n.output) & read}
        if not unread:
            break
        kept = [n for n in kept if id(n) not in unread]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    feedforward.drop_unread(model.graph)
    feedforward.record(model, METADATA_KEY, len(done))
    return len(done)
