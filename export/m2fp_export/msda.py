"""Plain-PyTorch multi-scale deformable attention, installed where ModelScope imports mmcv's.

ModelScope's ``maskdino/ms_deform_attn.py`` does
``from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction,
multi_scale_deformable_attn_pytorch`` and calls the CUDA function inside ``try`` with the
PyTorch form as the fallback. mmcv-full is the dependency the seed project fought with, so we
register a tiny in-memory ``mmcv`` package that offers exactly those two names: the function
object raises (so ModelScope takes its own fallback path) and the fallback is written here with
``grid_sample`` per level, which traces and exports to ONNX (GridSample, opset >= 16).

The exported graph calls the sampling as one node, ``ai.m2fp::MSDeformAttn``, defined in the same
file as a model-local ONNX function whose body is that ``grid_sample`` form (``attach_function``).
ONNX Runtime inlines the body, so the file runs anywhere; where the service registers its fused
kernel (``native/m2fp_msda.cc``), the node runs as one kernel instead.
"""

from __future__ import annotations

import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from m2fp_service.modelcard import MSDA_DOMAIN as DOMAIN
from m2fp_service.modelcard import MSDA_OP as OP

OP_VERSION = 1
_INPUTS = ("value", "spatial_shapes", "grids", "weights")


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


class _Sampling(torch.autograd.Function):
    """``sample_levels`` as one ONNX node (``ai.m2fp::MSDeformAttn``) when traced for export."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, value_spatial_shapes: torch.Tensor, grids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        return sample_levels(value, value_spatial_shapes, grids, weights)

    @staticmethod
    def symbolic(g: Any, value: Any, value_spatial_shapes: Any, grids: Any, weights: Any) -> Any:
        out = g.op(f"{DOMAIN}::{OP}", value, value_spatial_shapes, grids, weights)
        out.setType(value.type().with_sizes([None, None, None]))
        return out


def sample_levels_node(value: torch.Tensor, value_spatial_shapes: torch.Tensor, grids: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """``sample_levels``, exported as one ``ai.m2fp::MSDeformAttn`` node (same arguments, same result)."""
    return _Sampling.apply(value, value_spatial_shapes, grids, weights)  # type: ignore[no-any-return]


class _Body(torch.nn.Module):
    def forward(self, value: torch.Tensor, value_spatial_shapes: torch.Tensor, grids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        return sample_levels(value, value_spatial_shapes, grids, weights)


def function_proto(opset: int, levels: int, heads: int = 8, head_dim: int = 32, points: int = 4) -> Any:
    """The ONNX function ``ai.m2fp.MSDeformAttn``: ``sample_levels`` traced with standard ops.

    ``levels`` is unrolled (the model's level count); batch, queries and level sizes stay
    symbolic, so the body serves every input size. Initializers become Constant nodes.
    """
    import onnx
    from onnx import helper

    sizes = [(levels - level + 1, levels - level + 2) for level in range(levels)]  # any sizes >= 1
    total = sum(h * w for h, w in sizes)
    example = (torch.zeros(1, total, heads, head_dim), torch.tensor(sizes, dtype=torch.int64),
               torch.zeros(heads, total, levels, points, 2), torch.zeros(heads, 1, total, levels, points))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "body.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Body(), example, str(path), input_names=list(_INPUTS), output_names=["out"],
                              dynamic_axes={"value": {0: "n", 1: "s"}, "grids": {0: "nh", 1: "q"},
                                            "weights": {0: "nh", 2: "q"}, "out": {0: "n", 1: "q"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        graph = onnx.load(str(path)).graph
    inputs = [i.name for i in graph.input]
    if inputs != list(_INPUTS):
        raise RuntimeError(f"the traced MSDA body takes {inputs}, expected {list(_INPUTS)}")
    nodes = [helper.make_node("Constant", [], [init.name], value=init) for init in graph.initializer]
    return helper.make_function(DOMAIN, OP, list(_INPUTS), [graph.output[0].name], nodes + list(graph.node),
                                opset_imports=[helper.make_opsetid("", opset)])


def attach_function(model: Any, opset: int, levels: int, **shape: int) -> bool:
    """Adds the ``ai.m2fp.MSDeformAttn`` function to ``model`` (a ModelProto) if its graph calls it.

    Returns:
        Whether the graph calls it.
    """
    from onnx import helper

    if not any(node.domain == DOMAIN and node.op_type == OP for node in model.graph.node):
        return False
    if not any(f.domain == DOMAIN and f.name == OP for f in model.functions):
        model.functions.append(function_proto(opset, levels, **shape))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    return True


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
