"""DequantizeLinear nodes of an INT8 model's optimised graph that run for nothing, taken out.

ONNX Runtime's QDQ handling gives each reader of a quantized tensor its own ``DequantizeLinear`` (the
``duplicated`` nodes), and the exported graph dequantizes tensors only to measure them (``Shape``). In the
graph it saved for the bench INT8 model at 640x1152: the mask features (160 x 288 x 256 bytes) dequantized
four times, three of them for a Resize each and one for a Shape, ~5.5 ms per copy; 8 DequantizeLinear nodes
read by Shape nodes only; 151 copies in all (most of initialisers, a few microseconds each). ``rewrite`` makes
every Shape read the DequantizeLinear's input instead (the same shape), and every copy's readers read the first
of its kind (the same inputs and attributes: the same values), and drops what is then unread. The results are
the same bit for bit. The engine runs it in its INT8 rewrite of the saved graph (``int8graph.py``, a child
process), where the library runs AMX or AVX-512 VNNI.

A copy stays where its output is a graph output or is read inside a subgraph (If/Loop bodies), which would have
to be renamed too.
"""

from __future__ import annotations

import onnx

from m2fp_service.feedforward import drop_value_info, names_read, record

METADATA_KEY = "m2fp_qdedupe"  # how many DequantizeLinear nodes were dropped


def _key(node: onnx.NodeProto) -> bytes:
    """What makes two DequantizeLinear nodes compute the same tensor: their inputs and attributes."""
    same = onnx.NodeProto()
    same.op_type, same.domain = node.op_type, node.domain
    same.input.extend(node.input)
    same.attribute.extend(sorted(node.attribute, key=lambda a: a.name))
    return bytes(same.SerializeToString(deterministic=True))


def rewrite(model: onnx.ModelProto) -> int:
    """Rewires Shape readers and copies' readers of ``model``'s DequantizeLinear nodes (main graph) as the module's
    docstring says and drops the nodes no one reads then; returns how many were dropped."""
    graph = model.graph
    kept = {o.name for o in graph.output}
    for node in graph.node:  # names read inside subgraphs cannot be renamed here
        if any(a.HasField("g") or a.graphs for a in node.attribute):
            kept |= names_read([node]) - set(node.input)
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]
    renamed: dict[str, str] = {}
    first: dict[bytes, str] = {}
    for node in dequantize:
        output = node.output[0]
        if output in kept:
            continue
        renamed[output] = first.setdefault(_key(node), output)
    sources = {n.output[0]: n.input[0] for n in dequantize}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if node.op_type == "Shape" and name in sources and name not in kept:
                node.input[i] = sources[name]  # a DequantizeLinear has its input's shape
            elif renamed.get(name, name) != name:
                node.input[i] = renamed[name]
    read = names_read(list(graph.node)) | kept
    unread = [n for n in dequantize if n.output[0] not in read]
    if not unread:
        return 0
    gone = {id(n) for n in unread}
    nodes = [n for n in graph.node if id(n) not in gone]
    del graph.node[:]
    graph.node.extend(nodes)
    drop_value_info(graph, {n.output[0] for n in unread})
    record(model, METADATA_KEY, len(unread), ops=False)
    return len(unread)
