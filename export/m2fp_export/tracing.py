"""Export-time replacements for five ModelScope functions, patched in only while tracing.

Two of them freeze shapes when traced; the other three compute the same values in a form that
ONNX Runtime runs faster.

``MSDeformAttnTransformerEncoderOnly.forward`` builds the level shapes with
``torch.as_tensor([(h, w), ...])`` and ``get_reference_points`` loops over them with
``torch.linspace``; under ``torch.jit.trace`` both become constants of the example input, so the
exported graph would only accept that one size. The versions here compute the same values from
traced shapes. They are patched in only while exporting (:func:`export_patches`); the
export check compares the result against ModelScope's unpatched forward.

Both assume what M2FP inference always has: no padding masks (``valid_ratios`` are exactly 1).

``MultiScaleMaskedTransformerDecoder.forward_prediction_heads`` computes every decoder layer's
full quarter-resolution masks (100 x 256 x H/4 x W/4 multiply-adds each) and then shrinks them
bilinearly to build the next layer's attention mask. Bilinear resizing is linear per channel, so
``resize(einsum(E, F)) == einsum(E, resize(F))``: resizing the mask features instead gives the
same attention masks from a far smaller product, and the graph keeps the full-size product only
where it is an output (the last layer); tracing drops the rest. Equal up to float rounding.

``MSDeformAttn.forward`` builds the sampling points as ``reference[:, :, None, :, None, :] +
offsets / normalizer[None, None, None, :, None, :]``: two broadcasts in the middle of a 6-D tensor,
with 2 contiguous elements per run, which ONNX Runtime's element-wise kernels took ~45 ms per
encoder layer for at 640x1152 (2.9 M elements; more than the layer's value projection). The version
here scales the offset projection along its last axis, moves the heads outermost once (the layout
``grid_sample`` wants anyway) and adds the reference points with the heads as the broadcast axis;
it yields ``grid_sample``'s [-1, 1] coordinates directly. Equal up to float rounding. The sampling
itself is one ``ai.m2fp::MSDeformAttn`` node (``msda.sample_levels_node``).

``MultiScaleMaskedTransformerDecoder.forward`` unblocks, before each cross-attention, the queries
whose mask blocks everything: a sum over every pixel of the mask repeated for all 8 heads (as
int64), then an indexed assignment, then ``nn.MultiheadAttention`` turns the boolean mask into an
additive one with a ``Where`` over the same 8x tensor (~0.25 s of ONNX Runtime time at 640x1152).
``attention_bias`` does the same per query before the repeat, and the decoder's forward here is
ModelScope's without that step. Exactly equal. The mask products (``einsum("bqc,bchw->bqhw")``)
become one MatMul each (``_mask_product``), which ONNX Runtime runs about twice as fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from . import msda


def _encoder_only_forward(self: Any, srcs: list[torch.Tensor], masks: Any, pos_embeds: list[torch.Tensor]) -> Any:
    src_flatten, pos_flatten, shapes = [], [], []
    for lvl, (src, pos_embed) in enumerate(zip(srcs, pos_embeds, strict=True)):
        shapes.append(torch._shape_as_tensor(src)[2:])
        src_flatten.append(src.flatten(2).transpose(1, 2))
        pos_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
    src_flat = torch.cat(src_flatten, 1)
    pos_flat = torch.cat(pos_flatten, 1)
    spatial_shapes = torch.stack(shapes).to(torch.long)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = src_flat.new_ones((src_flat.shape[0], len(srcs), 2))
    memory = self.encoder(src_flat, spatial_shapes, level_start_index, valid_ratios, pos_flat, None)
    return memory, spatial_shapes, level_start_index


def _reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor, device: Any) -> torch.Tensor:
    refs = []
    for lvl in range(spatial_shapes.shape[0]):
        h_l, w_l = spatial_shapes[lvl, 0], spatial_shapes[lvl, 1]
        # linspace(0.5, n - 0.5, n) has step exactly 1, so it equals arange(n) + 0.5.
        ys = torch.arange(h_l, device=device).to(torch.float32) + 0.5
        xs = torch.arange(w_l, device=device).to(torch.float32) + 0.5
        ref_y, ref_x = torch.meshgrid(ys / h_l.to(torch.float32), xs / w_l.to(torch.float32), indexing="ij")
        refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1)[None])
    points = torch.cat(refs, 1).expand(valid_ratios.shape[0], -1, -1)
    return points[:, :, None] * valid_ratios[:, None]


def _deform_attn_forward(self: Any, query: torch.Tensor, reference_points: torch.Tensor,
                         input_flatten: torch.Tensor, input_spatial_shapes: torch.Tensor,
                         input_level_start_index: torch.Tensor, input_padding_mask: Any = None) -> torch.Tensor:
    n, len_q, _ = query.shape
    _, len_in, _ = input_flatten.shape
    heads, levels, points = self.n_heads, self.n_levels, self.n_points
    value = self.value_proj(input_flatten)
    if input_padding_mask is not None:
        value = value.masked_fill(input_padding_mask[..., None], 0.0)
    value = value.view(n, len_in, heads, self.d_model // heads)
    # The sampling points straight in grid_sample's coordinates, heads outermost:
    # 2 (reference + offset / (W_l, H_l)) - 1 = (2 reference - 1) + offset (2 / (W_l, H_l)).
    wh = torch.stack([input_spatial_shapes[:, 1], input_spatial_shapes[:, 0]], -1).to(query.dtype)
    scale = (2.0 / wh)[None, :, None, :].expand(heads, levels, points, 2).reshape(-1)
    offsets = (self.sampling_offsets(query) * scale).view(n, len_q, heads, levels * points * 2).transpose(1, 2)
    start = (2.0 * reference_points - 1.0)[:, None, :, :, None, :].expand(n, 1, len_q, levels, points, 2)
    grids = (offsets + start.reshape(n, 1, len_q, levels * points * 2)).reshape(n * heads, len_q, levels, points, 2)
    weights = F.softmax(self.attention_weights(query).view(n, len_q, heads, levels * points), -1)
    weights = weights.transpose(1, 2).reshape(n * heads, 1, len_q, levels, points)
    return self.output_proj(msda.sample_levels_node(value, input_spatial_shapes, grids, weights))  # type: ignore[no-any-return]


def _mask_product(mask_embed: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``einsum("bqc,bchw->bqhw")`` as one MatMul (ONNX Runtime's Einsum ran it ~2x slower)."""
    b, c, h, w = features.shape
    return torch.matmul(mask_embed, features.reshape(b, c, h * w)).reshape(b, mask_embed.shape[1], h, w)


def _prediction_heads(self: Any, output: torch.Tensor, mask_features: torch.Tensor,
                      attn_mask_target_size: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    decoder_output = self.decoder_norm(output).transpose(0, 1)
    outputs_class = self.class_embed(decoder_output)
    mask_embed = self.mask_embed(decoder_output)
    outputs_mask = _mask_product(mask_embed, mask_features)
    small_features = F.interpolate(mask_features, size=attn_mask_target_size, mode="bilinear", align_corners=False)
    attn_mask = _mask_product(mask_embed, small_features)
    return outputs_class, outputs_mask, attention_bias(attn_mask, self.num_heads).detach()


def attention_bias(mask_logits: torch.Tensor, heads: int) -> torch.Tensor:
    """The masked attention's mask, as ModelScope builds it over two functions, in one smaller form.

    ModelScope: ``blocked = sigmoid(logits) < 0.5`` repeated for every head, then (in the decoder's
    forward) a row that blocks everything unblocked, then ``nn.MultiheadAttention`` turns the
    boolean mask into an additive one (0 / -inf). Every head has the same row, so here the rows are
    fixed before the repeat and the additive mask is made at 1/heads of the size.

    Args:
        mask_logits: (B, Q, h, w) mask logits at the attention's resolution.

    Returns:
        (B*heads, Q, h*w) float: 0 where a query may attend, -inf where it may not.
    """
    blocked = mask_logits.sigmoid().flatten(2) < 0.5
    blocked = blocked & ~blocked.all(-1, keepdim=True)
    bias = torch.zeros_like(mask_logits.flatten(2)).masked_fill(blocked, float("-inf"))
    return bias.unsqueeze(1).repeat(1, heads, 1, 1).flatten(0, 1)


def _decoder_forward(self: Any, x: list[torch.Tensor], mask_features: torch.Tensor, mask: Any = None) -> Any:
    """ModelScope's ``MultiScaleMaskedTransformerDecoder.forward`` without its per-layer
    ``attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False``: the patched
    prediction heads return the mask with that done (and already additive)."""
    del mask
    src, pos, size_list = [], [], []
    for i in range(self.num_feature_levels):
        size_list.append(x[i].shape[-2:])
        pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
        src.append((self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
    _, bs, _ = src[0].shape
    query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
    output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
    outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
        output, mask_features, attn_mask_target_size=size_list[0])
    for i in range(self.num_layers):
        level_index = i % self.num_feature_levels
        output = self.transformer_cross_attention_layers[i](
            output, src[level_index], memory_mask=attn_mask, memory_key_padding_mask=None, pos=pos[level_index],
            query_pos=query_embed)
        output = self.transformer_self_attention_layers[i](output, tgt_mask=None, tgt_key_padding_mask=None,
                                                            query_pos=query_embed)
        output = self.transformer_ffn_layers[i](output)
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
            output, mask_features, attn_mask_target_size=size_list[(i + 1) % self.num_feature_levels])
    # The exported graph's outputs: the last layer's predictions (aux outputs are training-only).
    return {"pred_logits": outputs_class, "pred_masks": outputs_mask}


@contextlib.contextmanager
def export_patches() -> Iterator[None]:
    """Patches ModelScope's encoder and decoder for tracing, restoring them afterwards."""
    from modelscope.models.cv.image_human_parsing.m2fp import m2fp_decoder as dec
    from modelscope.models.cv.image_instance_segmentation.maskdino import maskdino_encoder as enc
    from modelscope.models.cv.image_instance_segmentation.maskdino import ms_deform_attn as mda

    only_cls = enc.MSDeformAttnTransformerEncoderOnly
    encoder_cls = enc.MSDeformAttnTransformerEncoder
    decoder_cls = dec.MultiScaleMaskedTransformerDecoder
    attn_cls = mda.MSDeformAttn
    saved = (only_cls.forward, encoder_cls.__dict__["get_reference_points"], decoder_cls.forward_prediction_heads,
             attn_cls.forward, decoder_cls.forward)
    only_cls.forward = _encoder_only_forward  # type: ignore[method-assign]
    encoder_cls.get_reference_points = staticmethod(_reference_points)  # type: ignore[method-assign]
    decoder_cls.forward_prediction_heads = _prediction_heads  # type: ignore[method-assign]
    attn_cls.forward = _deform_attn_forward  # type: ignore[method-assign]
    decoder_cls.forward = _decoder_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        (only_cls.forward, encoder_cls.get_reference_points, decoder_cls.forward_prediction_heads,
         attn_cls.forward, decoder_cls.forward) = saved
