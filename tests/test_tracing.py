"""The export-time decoder replacements (tracing.py) against ModelScope's own code."""

from __future__ import annotations

import pytest
import torch

from m2fp_export.tracing import attention_bias, export_patches


def modelscope_bias(mask_logits: torch.Tensor, heads: int) -> torch.Tensor:
    """What ModelScope does: the boolean mask per head, full rows unblocked, MultiheadAttention's float form."""
    blocked = mask_logits.sigmoid().flatten(2).unsqueeze(1).repeat(1, heads, 1, 1).flatten(0, 1) < 0.5
    blocked[torch.where(blocked.sum(-1) == blocked.shape[-1])] = False
    return torch.nn.functional._canonical_mask(mask=blocked, mask_name="attn_mask", other_type=None,
                                               other_name="", target_type=torch.float32)


def test_attention_bias_equals_modelscope_including_fully_blocked_queries() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, 7)
    logits[0, 1] = -torch.rand(5, 7) - 0.1  # blocks every pixel: must be unblocked
    logits[1, 4] = torch.rand(5, 7) + 0.1  # blocks nothing
    logits[1, 2, 0, 0] = 1e-9  # sigmoid rounds to 0.5 here: not blocked, as in ModelScope
    logits[1, 2, 0, 1] = -1e-3
    got = attention_bias(logits, heads=8)
    want = modelscope_bias(logits, heads=8)
    assert got.shape == want.shape == (16, 6, 35)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.isinf(got).any() and (got == 0).any()
    assert (got.view(2, 8, 6, 35)[0, :, 1] == 0).all()  # the fully blocked query sees everything


@pytest.mark.parametrize("hw", [(256, 384), (320, 224)])
def test_patched_decoder_equals_modelscope_forward(hw: tuple[int, int]) -> None:
    """The whole network with the export patches against ModelScope's unpatched forward (tiny config)."""
    from m2fp_export.convert import M2FPOnnxWrapper
    from m2fp_export.source import random_init

    model = M2FPOnnxWrapper(random_init("tiny", seed=0, confident=True).model).eval()
    image = torch.rand(1, 3, *hw) * 255
    with torch.no_grad():
        want = model(image)
        with export_patches():
            got = model(image)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and b.abs().max() > 1.0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
