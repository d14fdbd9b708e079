"""Plain-PyTorch multi-scale deformable attention, installed where ModelScope imports mmcv's.

ModelScope's ``maskdino/ms_deform_attn.py`` does
``from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction,
multi_scale_deformable_attn_pytorch`` and calls the CUDA function inside ``try`` with the
PyTorch form as the fallback. mmcv-full is the dependency the seed project fought with, so we
register a tiny in-memory ``mmcv`` package that offers exactly those two names: the function
object raises (so ModelScope takes its own fallback path) and the fallback is written here with
``grid_sample`` per level, which traces and exports to ONNX (GridSample, opset >= 16).
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F


class _NoCudaKernel:
    """Stands in for mmcv's CUDA autograd function; always defers to the PyTorch form."""

    @staticmethod
    def apply(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("mmcv CUDA kernel is not available; using the PyTorch form")


def multi_scale_deformable_attn_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by bilinear sampling on each level (mmcv's signature).

    Args:
        value: (N, sum(H_l*W_l), heads, C/heads) projected values of all levels, flattened.
        value_spatial_shapes: (L, 2) int64, (H_l, W_l) of each level.
        sampling_locations: (N, Q, heads, L, P, 2) float, (x, y) in [0, 1].
        attention_weights: (N, Q, heads, L, P) float, softmaxed over L*P.

    Returns:
        (N, Q, C) float tensor.
    """
    n, _, heads, _ = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    grids = (2.0 * sampling_locations - 1.0).transpose(1, 2).reshape(n * heads, num_queries, num_levels, num_points, 2)
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, num_queries, num_levels, num_points)
    return sample_levels(value, value_spatial_shapes, grids, weights)


def sample_levels(value: torch.Tensor, value_spatial_shapes: torch.Tensor, grids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """The sampling and weighted sum of multi-scale deformable attention, heads first.

    Args:
        value: (N, sum(H_l*W_l), heads, C/heads).
        value_spatial_shapes: (L, 2) int64, (H_l, W_l).
        grids: (N*heads, Q, L, P, 2) sampling points in ``grid_sample``'s [-1, 1] coordinates.
        weights: (N*heads, 1, Q, L, P) attention weights.

    Returns:
        (N, Q, C) float tensor.
    """
    n, _, heads, head_dim = value.shape
    num_queries, num_levels = grids.shape[1], grids.shape[2]
    sizes = value_spatial_shapes[:, 0] * value_spatial_shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    out = None
    for level in range(num_levels):
        h_l = value_spatial_shapes[level, 0]
        w_l = value_spatial_shapes[level, 1]
        # torch.narrow with a tensor start keeps the level split symbolic in a traced graph.
        value_l = torch.narrow(value, 1, starts[level], sizes[level])
        value_l = value_l.flatten(2).transpose(1, 2).reshape(n * heads, head_dim, h_l, w_l)
        sampled = F.grid_sample(value_l, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        # Weight and reduce each level as it is sampled. mmcv stacks every level's samples first:
        # the same sum, but in the exported graph a Concat of ~190 MB per encoder layer at 720p.
        part = (sampled * weights[:, :, :, level]).sum(-1)
        out = part if out is None else out + part
    assert out is not None
    return out.view(n, heads * head_dim, num_queries).transpose(1, 2).contiguous()


def install() -> None:
    """Registers the in-memory ``mmcv.ops.multi_scale_deform_attn`` module (idempotent)."""
    name = "mmcv.ops.multi_scale_deform_attn"
    if name in sys.modules and getattr(sys.modules[name], "__m2fp_shim__", False):
        return
    mmcv = sys.modules.get("mmcv") or types.ModuleType("mmcv")
    ops = types.ModuleType("mmcv.ops")
    msda = types.ModuleType(name)
    msda.__dict__.update(
        __m2fp_shim__=True,
        MultiScaleDeformableAttnFunction=_NoCudaKernel,
        multi_scale_deformable_attn_pytorch=multi_scale_deformable_attn_pytorch,
    )
    mmcv.ops = ops  # type: ignore[attr-defined]
    ops.multi_scale_deform_attn = msda  # type: ignore[attr-defined]
    sys.modules.setdefault("mmcv", mmcv)
    sys.modules["mmcv.ops"] = ops
    sys.modules[name] = msda
