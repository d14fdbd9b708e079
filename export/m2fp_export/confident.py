"""Makes untrained M2FP weights give non-trivial outputs, for test fixtures and demos.

Untrained, the decoder collapses all queries onto one or two classes and the mask logits sit
near zero, so nothing clears the thresholds. Zeroing the decoder layers' residual branches keeps
each query's own (random) identity; scaling the class head and the last mask-embedding layer then
makes class scores and masks confident, giving several classes and several "people".
"""

from __future__ import annotations

import torch


@torch.no_grad()
def make_confident(model: torch.nn.Module, class_scale: float = 40.0, mask_scale: float = 20.0) -> None:
    """Applies the recipe in place to ModelScope's M2FP."""
    predictor = model.sem_seg_head.predictor  # type: ignore[union-attr]
    for layer in predictor.transformer_self_attention_layers:
        layer.self_attn.out_proj.weight.zero_()
        layer.self_attn.out_proj.bias.zero_()
    for layer in predictor.transformer_cross_attention_layers:
        layer.multihead_attn.out_proj.weight.zero_()
        layer.multihead_attn.out_proj.bias.zero_()
    for layer in predictor.transformer_ffn_layers:
        layer.linear2.weight.zero_()
        layer.linear2.bias.zero_()
    predictor.class_embed.weight.mul_(class_scale)
    predictor.class_embed.bias.mul_(class_scale)
    last = predictor.mask_embed.layers[-1]
    last.weight.mul_(mask_scale)
    last.bias.mul_(mask_scale)
