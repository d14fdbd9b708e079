"""Transformer feed-forward blocks as one op: ``ai.m2fp::FeedForward`` of the custom-op library.

The exported graph computes a feed-forward block as five nodes::

    MatMul(x, W1) -> Add(b1) -> Relu -> MatMul(W2) -> Add(b2)

whose hidden tensor (tokens x F: 62 MB per pixel-decoder encoder layer at 640x1152) is written and
read four times. ``rewrite`` replaces each such chain with one ``FeedForward(x, W1, b1, W2, b2)``
node (``native/m2fp_ffn.cc``), which keeps a block of hidden rows in cache between the two products
and folds in the biases and the Relu: 1.3-1.4x faster than the five nodes at the encoder's shape on
this project's 2-core machines, AVX2 and AVX-512 alike (``bench/rewrites.py`` measures it inside the
network). Only ``onnx``
is used here; the engine applies it with the Winograd rewrite (``rewrite.py``, in a child process)
when it builds a session with the library.

A chain qualifies when both weights and biases are float initialisers, directly or through
``Identity`` nodes (the exporter shares equal tensors that way; INT8 models, whose weights are
quantised, are left alone; a bias may also be a DequantizeLinear of initialisers, the form a float
bias shared with a quantized convolution takes in an INT8 model), F and E are multiples of 16 (the
kernel's 16-column panels), and every intermediate tensor has exactly one reader and is not a graph output.

``rewrite_linear`` then does the same for the linear layers left (``MatMul(x, W) -> Add(b)``: the
attention's projections and the mask MLPs' last layers, 88 on M2FP), as ``ai.m2fp::Linear(x, W, b)``
on the same kernel: the bias is added as the product is stored instead of in a pass of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

import onnx
from onnx import helper

DOMAIN = "ai.m2fp"
METADATA_KEY = "m2fp_feedforward"  # how many blocks were fused (kept in the optimised graph)
LINEAR_METADATA_KEY = "m2fp_linear"  # how many linear layers were fused
COLUMNS = 16


class GraphIndex:
    """What the matching needs to know of a graph: its initialisers (the float ones also under the names of
    ``Identity`` nodes that copy them), each tensor's producer and readers, its outputs, and the
    DequantizeLinear nodes of initialisers (constants). ``qfeedforward`` adds what INT8 chains need."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.init = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.dims = {t.name: list(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        self.source = {name: name for name in self.dims}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in names_read([node]):  # a node with a subgraph reads what its body reads too
                self.readers.setdefault(name, []).append(node)
            if node.op_type == "Identity" and node.input[0] in self.source:
                self.source[node.output[0]] = self.source[node.input[0]]
        self.outputs = {o.name for o in graph.output}
        # Biases may also be DequantizeLinear nodes of initialisers: in an INT8 model, a float bias shared
        # with a quantized convolution (the exporter shares equal tensors) is read through the
        # convolution's quantized copy. Such a node is a constant; the fused op reads its output.
        initialisers = {t.name: list(t.dims) for t in graph.initializer}
        floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        self.constants = {n.output[0]: initialisers[n.input[0]] for n in graph.node
                          if n.op_type == "DequantizeLinear" and len(n.input) > 1 and n.input[1] in floats
                          and all(i in initialisers for i in n.input if i)}

    def weight(self, name: str) -> str | None:
        """The float initialiser ``name`` is (itself, or the one an Identity copies)."""
        return self.source.get(name)

    def sole_reader(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The one node reading ``name``, if it is an ``op_type`` and ``name`` is not a graph output."""
        found = self.readers.get(name, [])
        if name in self.outputs or len(found) != 1 or found[0].op_type != op_type:
            return None
        return found[0]

    def only_reader(self, node: onnx.NodeProto) -> bool:
        """A chain reading ``node``'s output is all that reads it (no other node, not a graph output)."""
        return len(self.readers.get(node.output[0], [])) == 1 and node.output[0] not in self.outputs

    def bias(self, add: onnx.NodeProto, product: str, size: int) -> str | None:
        """The constant ``add`` adds to ``product``: a float initialiser (or the output of a DequantizeLinear
        of initialisers) of shape (size,); else None."""
        if len(add.input) != 2 or product not in add.input:
            return None
        name = str(add.input[1] if add.input[0] == product else add.input[0])
        if self.constants.get(name) == [size]:
            return name
        source = self.weight(name)
        return source if source is not None and self.dims[source] == [size] else None


class Block(NamedTuple):
    """A qualifying chain: its fused op's inputs and the nodes it replaces (a feed-forward block:
    [x, W1, b1, W2, b2] and five nodes; a linear layer: [x, W, b], MatMul and Add)."""

    inputs: list[str]
    nodes: list[onnx.NodeProto]


G = TypeVar("G", bound=GraphIndex)


def match_linear(node: onnx.NodeProto, g: GraphIndex) -> Block | None:
    """The linear layer MatMul ``node`` starts (``node`` and the Add of a bias, its sole reader), or None."""
    w = g.weight(node.input[1]) if node.op_type == "MatMul" else None
    if w is None or len(g.dims[w]) != 2 or g.dims[w][1] % COLUMNS or node.output[0] in g.outputs:
        return None
    add = g.sole_reader(node.output[0], "Add")
    b = add and g.bias(add, node.output[0], g.dims[w][1])
    return Block([node.input[0], w, b], [node, add]) if add and b else None


def match(first: onnx.NodeProto, g: GraphIndex) -> Block | None:
    """The block that starts with MatMul ``first``: a linear layer, a Relu, a second linear layer
    whose D is the first's E, each node its predecessor's sole reader; or None."""
    one = match_linear(first, g)
    relu = g.sole_reader(one.nodes[1].output[0], "Relu") if one else None
    second = g.sole_reader(relu.output[0], "MatMul") if relu else None
    two = match_linear(second, g) if relu and second and second.input[0] == relu.output[0] else None
    if not (one and relu and two) or g.dims[two.inputs[1]][0] != g.dims[one.inputs[1]][1]:
        return None
    if any(o in g.outputs for n in (one.nodes[1], relu) for o in n.output):
        return None
    return Block([*one.inputs, *two.inputs[1:]], [*one.nodes, relu, *two.nodes])


def blocks(graph: onnx.GraphProto, matcher: Callable[[onnx.NodeProto, GraphIndex], Block | None] = match
           ) -> list[Block]:
    """The graph's qualifying chains in node order (feed-forward blocks, or linear layers with
    ``matcher=match_linear``); where two overlap (an MLP of three layers), the first."""
    return find(graph, matcher, GraphIndex(graph))


def find(graph: onnx.GraphProto, matcher: Callable[[onnx.NodeProto, G], Block | None], g: G) -> list[Block]:
    """The chains ``matcher`` finds in ``graph`` (indexed as ``g``) in node order; where two overlap, the first."""
    found: list[Block] = []
    taken: set[int] = set()
    for node in graph.node:
        block = None if id(node) in taken else matcher(node, g)
        if block is not None:
            found.append(block)
            taken.update(id(n) for n in block.nodes)
    return found


def names_read(nodes: list[onnx.NodeProto]) -> set[str]:
    """Every tensor name the nodes read, also from inside their subgraphs (If/Loop bodies)."""
    read: set[str] = set()
    for node in nodes:
        read.update(node.input)
        for attribute in node.attribute:
            for body in [attribute.g, *attribute.graphs] if attribute.HasField("g") or attribute.graphs else []:
                read |= names_read(list(body.node)) | {o.name for o in body.output}
    return read


def drop_unread(graph: onnx.GraphProto) -> None:
    """Initialisers that no node reads any more (subgraphs included) and that are not graph outputs leave
    ``graph``, and so do graph inputs of their names (old models list initialisers as inputs too)."""
    read = names_read(list(graph.node)) | {o.name for o in graph.output}
    gone = {t.name for t in graph.initializer if t.name not in read}
    # Deleted where they are: rebuilding the list would copy every weight kept (the model's size, at once).
    for field in (graph.initializer, graph.input):
        for i in reversed([i for i, t in enumerate(field) if t.name in gone]):
            del field[i]


def record(model: onnx.ModelProto, key: str, count: int, *, ops: bool = True) -> None:
    """Marks ``model`` rewritten: ``count`` under metadata ``key`` (the engine reads it back from the optimised
    graph) and, when ``ops`` (its new nodes are the library's), the library's domain among its opsets."""
    if ops and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, key: str(count)})


def drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """The shapes recorded for tensors ``names`` (no longer in the graph) leave ``graph``."""
    for value in [v for v in graph.value_info if v.name in names]:
        graph.value_info.remove(value)


def drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Nodes none of whose outputs anything reads (subgraphs included) or the graph outputs leave ``graph``, until
    none is left (what only they read goes with them), and so do the shapes recorded for their outputs."""
    gone: set[str] = set()
    while True:
        read = names_read(list(graph.node)) | {o.name for o in graph.output}
        kept = [n for n in graph.node if any(o in read for o in n.output if o)]
        if len(kept) == len(graph.node):
            break
        gone |= {o for n in graph.node for o in n.output} - {o for n in kept for o in n.output}
        del graph.node[:]
        graph.node.extend(kept)
    drop_value_info(graph, gone)


def rewrite(model: onnx.ModelProto) -> int:
    """Fuses ``model``'s qualifying feed-forward blocks in place (main graph only); returns how many."""
    return fuse(model, blocks(model.graph), "FeedForward", METADATA_KEY)


def rewrite_linear(model: onnx.ModelProto) -> int:
    """Fuses ``model``'s qualifying linear layers in place (main graph only; after ``rewrite``, so
    the feed-forward blocks' layers are taken already); returns how many."""
    return fuse(model, blocks(model.graph, match_linear), "Linear", LINEAR_METADATA_KEY)


def fuse(model: onnx.ModelProto, found: list[Block], op_type: str, key: str) -> int:
    """Replaces each chain of ``found`` with one ``op_type`` node where its last node was (every input, a
    bias computed from initialisers too, is there by then); its count goes to metadata ``key``."""
    graph = model.graph
    if not found:
        return 0
    fused = {id(b.nodes[-1]): helper.make_node(  # the chain's last node -> its fused node
        op_type, b.inputs, [b.nodes[-1].output[0]],
        name=f"{b.nodes[0].name or b.nodes[0].output[0]}_{op_type.lower()}", domain=DOMAIN) for b in found}
    gone = {id(n) for b in found for n in b.nodes}
    weights = {t.name for t in graph.initializer}
    operands = names_read([n for n in graph.node if id(n) in gone])
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) in fused or id(n) not in gone]
    # Identity copies of weights that only the fused blocks' old nodes read are dropped.
    read = names_read(nodes) | {o.name for o in graph.output}
    nodes = [n for n in nodes if not (n.op_type == "Identity" and n.output[0] in operands and n.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(nodes)
    known = {o for n in nodes for o in n.output} | {i.name for i in graph.input} | weights
    stale = [v for v in graph.value_info if v.name not in known]  # the fused blocks' intermediates
    for value in stale:
        graph.value_info.remove(value)
    record(model, key, len(fused))
    return len(fused)
