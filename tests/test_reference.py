"""The engine against ModelScope's own M2FP pipeline: same weights, same real photograph.

Required: label maps agree on >= 99.5% of pixels, the same people (count and masks, IoU >= 0.95),
and the outputs are non-trivial (several classes, at least two people) so the comparison means
something.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2fp_service.engine import ParsingEngine
from m2fp_service.pipeline import parse_array


def _reference(pipe, image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], int]:  # type: ignore[no-untyped-def]
    """Runs ModelScope's pipeline; returns its label map, person masks (score order) and part count."""
    import torch

    with torch.no_grad():
        out = pipe.forward(pipe.preprocess(Image.fromarray(image)))
    parsing = out["eval_result"][0]["parsing"]
    label_map = parsing["semantic_outputs"].argmax(0).numpy()
    people = sorted(parsing["human_outputs"], key=lambda h: -h["score"])
    # The pipeline's public output keeps these same instances (mask > 0) with their labels.
    public = pipe.postprocess(out)
    assert len(public["labels"]) == len(parsing["part_outputs"]) + len(parsing["human_outputs"])
    return label_map, [p["mask"].numpy() > 0 for p in people], len(parsing["part_outputs"])


def _compare(engine: ParsingEngine, pipe, image: np.ndarray) -> dict[str, float]:  # type: ignore[no-untyped-def]
    ref_labels, ref_people, ref_parts = _reference(pipe, image)
    ours = parse_array(engine, image, mode="exact")
    # Non-trivial on both sides, or the comparison proves nothing.
    assert len(np.unique(ref_labels)) >= 5, np.unique(ref_labels)
    assert len(ref_people) >= 2
    agreement = float((ours.label_map == ref_labels).mean())
    assert agreement >= 0.995, agreement
    assert ours.num_people == len(ref_people)
    ious = [float((a & b).sum() / max((a | b).sum(), 1)) for a, b in zip(ref_people, ours.person_masks, strict=True)]
    assert min(ious) >= 0.95, ious
    assert len(ours.parts) == ref_parts
    return {"agreement": agreement, "min_iou": min(ious), "people": len(ref_people)}


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from m2fp_export.source import random_init
    from tests.conftest import TINY_SEED, reference_pipeline

    return reference_pipeline(random_init("tiny", seed=TINY_SEED, confident=True), tmp_path_factory.mktemp("ref"))


@pytest.mark.parametrize(
    "size_wh",
    [None, (1280, 720), (300, 500), (2000, 900)],
    ids=["photo-1024x512", "720p", "small-portrait-upscaled", "large-downscaled"],
)
def test_tiny_matches_modelscope_pipeline(engine: ParsingEngine, tiny_reference, photo: np.ndarray,  # type: ignore[no-untyped-def]
                                          size_wh: tuple[int, int] | None) -> None:
    image = photo if size_wh is None else np.asarray(Image.fromarray(photo).resize(size_wh, Image.BILINEAR))
    stats = _compare(engine, tiny_reference, image)
    print(f"tiny {image.shape[1]}x{image.shape[0]}: {stats}")


def test_fast_mode_agreement_with_exact(engine: ParsingEngine, photo: np.ndarray) -> None:
    """'fast' post-processing (model-input resolution, upsampled late) against the exact path.

    The untrained fixture's label maps are speckled noise (the worst case for any resampling);
    the bound here is what such noise allows, the measured figure is printed for the README.
    """
    big = np.asarray(Image.fromarray(photo).resize((2048, 1024), Image.BILINEAR))
    exact = parse_array(engine, big, mode="exact")
    fast = parse_array(engine, big, mode="fast")
    agreement = float((exact.label_map == fast.label_map).mean())
    print(f"fast vs exact at 2048x1024: {agreement:.4f} of pixels agree")
    assert len(np.unique(exact.label_map)) >= 5
    assert agreement >= 0.9
    assert fast.num_people == exact.num_people
    small = parse_array(engine, photo, mode="fast")  # smaller than the model input: fast == exact
    assert np.array_equal(small.label_map, parse_array(engine, photo, mode="exact").label_map)


@pytest.mark.slow
def test_full_size_matches_modelscope_pipeline(full_model_path: Path, photo: np.ndarray,
                                               tmp_path: Path) -> None:
    from m2fp_export.source import random_init
    from tests.conftest import TINY_SEED, reference_pipeline

    pipe = reference_pipeline(random_init("cihp-r101", seed=TINY_SEED, confident=True), tmp_path)
    stats = _compare(ParsingEngine(full_model_path), pipe, photo)
    print(f"full-size {photo.shape[1]}x{photo.shape[0]}: {stats}")
