"""Built-in M2FP configurations, laid out like the ``model`` section of ModelScope's
``configuration.json`` for ``damo/cv_resnet101_image-multiple-human-parsing``.

``CIHP_R101`` mirrors the authors' CIHP setting (ResNet-101 with the DeepLab stem, MSDeformAttn
pixel decoder with 6 encoder layers on res3-res5, masked-attention decoder with 9 layers and 100
queries, 20 parsing classes + 1 human class). ``TINY`` keeps the same code, classes and output
layout at a fraction of the width and depth, so tests can build and export it in seconds.
"""

from __future__ import annotations

import copy
from typing import Any

MODEL_ID = "damo/cv_resnet101_image-multiple-human-parsing"

# CIHP parsing classes in label order, then the "human" class used for person instances.
CIHP_CLASSES = [
    "background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat",
    "socks", "pants", "torso-skin", "scarf", "skirt", "face", "left-arm", "right-arm",
    "left-leg", "right-leg", "left-shoe", "right-shoe", "human",
]  # fmt: skip

CIHP_R101: dict[str, Any] = {
    "type": "m2fp",
    "backbone": {
        "out_features": ["res2", "res3", "res4", "res5"],
        "depth": 101,
        "num_groups": 1,
        "width_per_group": 64,
        "norm": "BN",
        "stem_out_channels": 128,
        "res2_out_channels": 256,
        "stride_in_1x1": False,
        "res4_dilation": 1,
        "res5_dilation": 1,
        "res5_multi_grid": [1, 1, 1],
    },
    "encoder": {
        "in_features": ["res2", "res3", "res4", "res5"],
        "transformer_dropout": 0.0,
        "transformer_nheads": 8,
        "transformer_dim_feedforward": 1024,
        "transformer_enc_layers": 6,
        "conv_dim": 256,
        "mask_dim": 256,
        "transformer_in_features": ["res3", "res4", "res5"],
        "common_stride": 4,
    },
    "decoder": {
        "num_classes": 21,
        "hidden_dim": 256,
        "num_queries": 100,
        "nheads": 8,
        "dim_feedforward": 2048,
        "dec_layers": 9,
        "pre_norm": False,
        "mask_dim": 256,
        "enforce_input_project": False,
    },
    "classes": CIHP_CLASSES,
    "num_parsing": 20,
    "single_human": False,
    "parsing_ins_score_thr": 0.5,
    "parsing_on": True,
    "semantic_on": False,
    "sem_seg_postprocess_before_inference": True,
}

TINY: dict[str, Any] = copy.deepcopy(CIHP_R101)
TINY["backbone"].update(
    depth=50, width_per_group=8, stem_out_channels=32, res2_out_channels=32
)
TINY["encoder"].update(
    transformer_nheads=4, transformer_dim_feedforward=128, transformer_enc_layers=1,
    conv_dim=64, mask_dim=64,
)  # fmt: skip
TINY["decoder"].update(hidden_dim=64, nheads=4, dim_feedforward=128, dec_layers=3, mask_dim=64)

BUILTIN = {"cihp-r101": CIHP_R101, "tiny": TINY}


def builtin_config(name: str) -> dict[str, Any]:
    """Returns a deep copy of a built-in ``model`` configuration by name."""
    try:
        return copy.deepcopy(BUILTIN[name])
    except KeyError:
        raise ValueError(f"unknown built-in configuration {name!r}; choose from {sorted(BUILTIN)}") from None
