"""The hybrid frame processor on a generated clip of a real person, with the real light model and tiny M2FP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m2fp_service import labelsets, pipeline
from m2fp_service.imaging import compose
from m2fp_service.imaging.compose import ComposeOptions
from m2fp_service.outputs import ComposeSpec
from m2fp_service.selection import Keep
from m2fp_service.video.io import Frame, VideoReader
from m2fp_service.video.keyframes import KeyframeWorker
from m2fp_service.video.processor import FrameProcessor, VideoOptions
from tests.video.conftest import CLIP_FPS, CLIP_HW, figure_x


@pytest.fixture(scope="module")
def segmenter(light_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    from m2fp_service.segmenter import PersonSegmenter

    return PersonSegmenter(light_models["landscape"], intra_op_threads=1)


@pytest.fixture(scope="module")
def frames(clip_path: Path) -> list[np.ndarray]:
    reader = VideoReader(clip_path)
    out = [item.rgb for item in reader if isinstance(item, Frame)]
    reader.close()
    return out


def blur_options(keep: str = "people", invert: bool = False, **kw: object) -> VideoOptions:
    labels = labelsets.label_set("cihp")
    spec = ComposeSpec(keep=Keep.parse(keep, labels.classes), invert=invert,
                       options=ComposeOptions(mode="blur", blur_sigma_px=12))
    return VideoOptions(spec=spec, labels=labels, **kw)  # type: ignore[arg-type]


def figure_box(index: int) -> tuple[slice, slice]:
    """Head and chest of the pasted astronaut in frame ``index`` (hand-checked on the clip)."""
    x0 = figure_x(index)
    return slice(CLIP_HW[0] - 280, CLIP_HW[0] - 20), slice(x0 + 50, x0 + 170)


def test_the_kept_region_covers_the_person_and_follows_her(segmenter, frames: list[np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    processor = FrameProcessor(segmenter, blur_options(), CLIP_FPS)
    centres = []
    for i, frame in enumerate(frames):
        result = processor.process(i, frame)
        assert result.image.shape == (*CLIP_HW, 3) and result.alpha.shape == CLIP_HW
        ys, xs = figure_box(i)
        assert result.alpha[ys, xs].mean() > 0.8, f"frame {i}: the person is kept"
        assert result.alpha[:60, :].mean() < 0.05 and result.alpha[:, -40:].mean() < 0.05, "the scene is not"
        kept = result.alpha > 0.5
        centres.append(np.nonzero(kept)[1].mean())
        np.testing.assert_array_equal(result.image[result.alpha >= 1], frame[result.alpha >= 1])
    steps = np.diff(centres)
    assert np.corrcoef(centres, [figure_x(i) for i in range(len(frames))])[0, 1] > 0.98
    assert np.median(steps) == pytest.approx(6, abs=2), "the kept region moves with the figure (6 px/frame)"


def test_matte_hands_compose_the_border_sums_of_its_alpha(segmenter, frames: list[np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    """The border's colour sums are taken on the matte's thread; the picture is the one compositing
    the alpha alone gives."""
    processor = FrameProcessor(segmenter, blur_options(), CLIP_FPS)
    for i, frame in enumerate(frames[:3]):
        result = processor.process(i, frame)
        assert result.sums is not None and "border" in result.seconds
        assert ((result.alpha > 0) & (result.alpha < 1)).any(), "a border to estimate colours on"
        np.testing.assert_array_equal(result.sums, compose.border_sums(frame, result.alpha))
        alone = compose.composite(frame, result.alpha, processor.options.spec.options)
        np.testing.assert_array_equal(result.image, alone)


def test_matte_alone_skips_the_border_sums(segmenter, frames: list[np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    """The live mask output's path: the same alpha, no sums taken."""
    bare, full = (FrameProcessor(segmenter, blur_options(), CLIP_FPS) for _ in range(2))
    for i, frame in enumerate(frames[:3]):
        a, b = bare.matte(i, frame, border=False), full.matte(i, frame)
        assert a.sums is None and "border" not in a.seconds and b.sums is not None
        assert (a.alpha > 0.5).any() and (a.alpha < 0.5).any(), "the person kept, the scene not"
        np.testing.assert_array_equal(a.alpha, b.alpha)


def test_smoothing_cuts_flicker_on_a_still_scene(segmenter, frames: list[np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    still = [np.clip(frames[10].astype(int) + rng.normal(0, 4, frames[10].shape), 0, 255).astype(np.uint8)
             for _ in range(15)]
    flicker = {}
    for smoothing in (False, True):
        processor = FrameProcessor(segmenter, blur_options(smoothing=smoothing), CLIP_FPS)
        alphas = [processor.process(i, f).alpha for i, f in enumerate(still)]
        changes = [np.abs(a - b).mean() for a, b in zip(alphas[:-1], alphas[1:], strict=True)]
        flicker[smoothing] = float(np.mean(changes))
    assert flicker[False] > 0, "the raw model must flicker a little on noisy frames, or this test proves nothing"
    assert flicker[True] < 0.7 * flicker[False], flicker


def test_parts_from_key_frames_are_never_older_than_one_interval(segmenter, frames: list[np.ndarray],  # type: ignore[no-untyped-def]
                                                                  engine) -> None:
    options = blur_options(keep="largest", keyframe_interval_s=0.4)  # 10 frames at 25 fps
    worker = KeyframeWorker(lambda f: pipeline.parse_array(engine, f, mode="fast"), ordered=True)
    processor = FrameProcessor(segmenter, options, CLIP_FPS, worker)
    ages, people = [], set()
    try:
        for i, frame in enumerate(frames):
            if processor.is_key(i):  # what the file reader does, ahead of the loop
                worker.submit(i, frame, processor.key_gray(frame))
            result = processor.process(i, frame)
            ages.append(result.parts_age)
            people.update(result.people)
            assert (result.alpha > 0.5).any(), f"frame {i}: the largest person is kept"
    finally:
        worker.close()
    assert processor.interval == 10 and processor.key_frames_used == 4
    assert all(age is not None and 0 <= age < 10 for age in ages), ages
    assert ages[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert people, "the tiny model finds people; ids are listed"


def test_blur_only_a_class_leaves_the_rest_untouched(segmenter, frames: list[np.ndarray], engine) -> None:  # type: ignore[no-untyped-def]
    first = pipeline.parse_array(engine, frames[0], mode="fast")
    inside = first.label_map[figure_box(0)]
    present = [c for c in np.unique(inside) if c]
    assert present, "the tiny model labels parts on the person"
    name = first.classes[int(np.bincount(inside.ravel(), minlength=20)[1:].argmax()) + 1]
    options = blur_options(keep=f"classes:{name}", invert=True, keyframe_interval_s=1.0)
    worker = KeyframeWorker(lambda f: pipeline.parse_array(engine, f, mode="fast"), ordered=True)
    processor = FrameProcessor(segmenter, options, CLIP_FPS, worker)
    try:
        worker.submit(0, frames[0], processor.key_gray(frames[0]))
        result = processor.process(0, frames[0])
    finally:
        worker.close()
    changed = np.abs(result.image.astype(int) - frames[0]).sum(axis=2) > 0
    assert changed.any(), f"the {name} pixels are blurred"
    x0 = figure_x(0)
    assert not changed[:40].any() and not changed[:, x0 + 260:].any(), "the scene far from the person is untouched"


def test_live_policy_never_waits_and_falls_back_until_parts_arrive(segmenter, frames: list[np.ndarray],  # type: ignore[no-untyped-def]
                                                                  engine) -> None:
    import time

    options = blur_options(keep="largest", key_policy="latest", keyframe_interval_s=0.2)
    worker = KeyframeWorker(lambda f: pipeline.parse_array(engine, f, mode="fast"))
    processor = FrameProcessor(segmenter, options, CLIP_FPS, worker)
    try:
        first = processor.process(0, frames[0])
        assert first.parts_age is None, "no key frame has finished yet: no parts"
        assert (first.alpha > 0.5).mean() > 0.05, "meanwhile everyone is kept"
        deadline = time.monotonic() + 60
        i = 1
        while time.monotonic() < deadline:
            result = processor.process(i % len(frames), frames[i % len(frames)])
            if result.parts_age is not None:
                break
            i += 1
            time.sleep(0.02)
        assert result.parts_age is not None and processor.key_frames_used >= 1
    finally:
        worker.close()


def test_keep_choices_that_need_m2fp_require_a_worker(segmenter) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="needs M2FP key frames"):
        FrameProcessor(segmenter, blur_options(keep="central"), CLIP_FPS)
