"""Our multi-scale deformable attention against mmcv's PyTorch reference formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2fp_export import msda


def mmcv_reference(value: torch.Tensor, shapes: torch.Tensor, locations: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """mmcv.ops.multi_scale_deform_attn.multi_scale_deformable_attn_pytorch, as published."""
    bs, _, num_heads, embed_dims = value.shape
    _, num_queries, num_heads, num_levels, num_points, _ = locations.shape
    value_list = value.split([int(h) * int(w) for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = value_list[level].flatten(2).transpose(1, 2).reshape(bs * num_heads, embed_dims, int(h), int(w))
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(bs * num_heads, 1, num_queries, num_levels * num_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(bs, num_heads * embed_dims, num_queries)
    return out.transpose(1, 2).contiguous()


@pytest.mark.parametrize(("levels", "heads", "points"), [((8, 12), 2, 4), ((10, 6), 4, 1), ((16, 16), 1, 3)])
def test_matches_mmcv_formula(levels: tuple[int, int], heads: int, points: int) -> None:
    torch.manual_seed(0)
    shapes = torch.tensor([[levels[0] // s, levels[1] // s] for s in (1, 2, 4)], dtype=torch.long)
    length = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(2, length, heads, 8)
    locations = torch.rand(2, 7, heads, 3, points, 2) * 1.2 - 0.1  # some samples fall outside
    weights = torch.softmax(torch.randn(2, 7, heads, 3 * points), -1).view(2, 7, heads, 3, points)
    got = msda.multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
    want = mmcv_reference(value, shapes, locations, weights)
    assert got.shape == (2, 7, heads * 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want.abs().max() > 0.1  # non-trivial


def test_install_registers_modelscope_import() -> None:
    msda.install()
    from mmcv.ops.multi_scale_deform_attn import (  # type: ignore[import-not-found]
        MultiScaleDeformableAttnFunction,
        multi_scale_deformable_attn_pytorch,
    )

    assert multi_scale_deformable_attn_pytorch is msda.multi_scale_deformable_attn_pytorch
    with pytest.raises(RuntimeError, match="not available"):
        MultiScaleDeformableAttnFunction.apply()
    msda.install()  # idempotent


def test_export_forward_matches_modelscope_forward() -> None:
    """The export-time MSDeformAttn.forward (tracing.py) gives ModelScope's own forward's output."""
    msda.install()
    from modelscope.models.cv.image_instance_segmentation.maskdino.ms_deform_attn import MSDeformAttn

    from m2fp_export.tracing import _deform_attn_forward

    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=4).eval()
    with torch.no_grad():  # ModelScope zero-initialises the offsets; make them move the samples
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    shapes = torch.tensor([[12, 20], [6, 10], [3, 5]], dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    length = int((shapes[:, 0] * shapes[:, 1]).sum())
    query = torch.randn(2, length, 32)
    reference = torch.rand(2, length, 3, 2)
    flat = torch.randn(2, length, 32)
    with torch.no_grad():
        want = attn(query, reference, flat, shapes, starts)
        got = _deform_attn_forward(attn, query, reference, flat, shapes, starts)
    assert got.shape == want.shape == (2, length, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert want.abs().max() > 0.1
