"""The graph rewrites the custom-op library makes possible, applied when a session is built with it.

- ``winograd.rewrite``: large 3x3 convolutions as Winograd F(4x4, 3x3).
- ``feedforward.rewrite``: transformer feed-forward blocks (MatMul, Add, Relu, MatMul, Add) as one
  ``ai.m2fp::FeedForward`` node.
- ``feedforward.rewrite_linear``: the linear layers left (MatMul, Add) as ``ai.m2fp::Linear`` nodes.
- ``softmax.rewrite``: Softmax nodes after an additive mask (the masked attention) as ``ai.m2fp::Softmax``.
- ``posembed.rewrite``: the sine position embeddings (each proved on the spot) as
  ``ai.m2fp::SinePositionEmbedding``.
- ``qfeedforward.rewrite`` and ``rewrite_linear``: an INT8 model's feed-forward blocks and linear layers
  (their quantize-dequantize chains) as ``ai.m2fp::QFeedForward`` and ``ai.m2fp::QLinear`` nodes, only
  when asked (``--int8-feedforward``: the engine asks where the library runs them on AMX tiles or with
  AVX-512 VNNI).

The model file is not changed: the engine runs ``python -m m2fp_service.rewrite MODEL`` in a child
process (parsing and serialising a 230 MB protobuf holds the GIL for up to a second at a time) and
opens the rewritten bytes; the optimised-graph cache keeps the result. Each rewrite records its
count in the graph's metadata. Nothing here imports onnxruntime.
"""

from __future__ import annotations

import sys

import onnx

from m2fp_service import feedforward, posembed, qfeedforward, softmax, winograd


def apply(model: onnx.ModelProto, int8_feedforward: bool = False) -> dict[str, int]:
    """Applies every rewrite to ``model`` in place (the INT8 feed-forward one when ``int8_feedforward``);
    returns how many nodes each one replaced."""
    return {"winograd_convolutions": winograd.rewrite(model), "feedforward_blocks": feedforward.rewrite(model),
            "int8_feedforward_blocks": qfeedforward.rewrite(model) if int8_feedforward else 0,
            "int8_linear_layers": qfeedforward.rewrite_linear(model) if int8_feedforward else 0,
            "linear_layers": feedforward.rewrite_linear(model), "softmax_nodes": softmax.rewrite(model),
            "position_embeddings": posembed.rewrite(model)}


def main(argv: list[str] | None = None) -> int:
    """``python -m m2fp_service.rewrite [--int8-feedforward] MODEL``: the rewritten model on stdout
    (nothing when no rewrite applies), what was done on stderr."""
    args = sys.argv[1:] if argv is None else argv
    int8_feedforward = "--int8-feedforward" in args
    args = [a for a in args if a != "--int8-feedforward"]
    if len(args) != 1:
        print("usage: python -m m2fp_service.rewrite [--int8-feedforward] MODEL.onnx", file=sys.stderr)
        return 2
    model = onnx.load(args[0])
    counts = apply(model, int8_feedforward)
    if any(counts.values()):
        sys.stdout.buffer.write(model.SerializeToString())
    print(f"graph rewrites: {counts['winograd_convolutions']} 3x3 convolution(s) as Winograd F(4x4, 3x3), "
          f"{counts['feedforward_blocks']} feed-forward block(s) fused, "
          f"{counts['int8_feedforward_blocks']} INT8 feed-forward block(s) fused, "
          f"{counts['int8_linear_layers']} INT8 linear layer(s) fused, "
          f"{counts['linear_layers']} linear layer(s) fused, {counts['softmax_nodes']} softmax(es) replaced, "
          f"{counts['position_embeddings']} position embedding(s) replaced",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
