"""Property-based tests (hypothesis) of the three pure stages around the model.

- decode: any byte string either decodes to an (H, W, 3) uint8 array within the limits or raises one
  of our typed errors; nothing else escapes (no Pillow exception, no warning, no crash);
- preprocess: any RGB array gives the model input the policy promises;
- postprocess: any raw model output of a valid shape (NaN and infinities included) gives a valid
  ``ParsingResult`` at the image's size.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from m2fp_service.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from m2fp_service.imaging import postprocess
from m2fp_service.imaging.decode import decode_image
from m2fp_service.imaging.preprocess import PreprocessMeta, padded_hw, prepare, resized_hw
from m2fp_service.modelcard import InferenceSettings, InputPolicy

MAX_PIXELS = 250_000
MAX_SIDE = 2000
TYPED = (InvalidImage, UnsupportedMediaType, ImageTooLarge)
SIGNATURES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"GIF89a", b"II*\x00",
              b"<svg", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\x00\x00\x00\x18ftypheic"]
FORMATS = {"JPEG": ["RGB", "L", "CMYK"], "PNG": ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"], "WEBP": ["RGB", "RGBA"],
           "BMP": ["RGB", "L", "P", "1"]}


def assert_decodes_or_refuses(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warnings (bombs, corrupt EXIF) must not leak either
        try:
            out = decode_image(data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
        except TYPED as exc:
            assert exc.message and exc.status in (413, 415, 422)
            return
    rgb = out.rgb
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert 1 <= rgb.shape[0] * rgb.shape[1] <= MAX_PIXELS and max(rgb.shape[:2]) <= MAX_SIDE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_decode_or_get_a_typed_error(data: bytes) -> None:
    assert_decodes_or_refuses(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SIGNATURES), st.binary(max_size=2048))
def test_any_bytes_behind_a_known_signature(signature: bytes, rest: bytes) -> None:
    assert_decodes_or_refuses(signature + rest)


@st.composite
def real_pictures(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    pixels = draw(hnp.arrays(np.uint8, (height, width, 3), elements=st.integers(0, 255)))
    im = Image.fromarray(pixels)
    im = im.convert("L").convert("I;16") if mode == "I;16" else im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": draw(st.integers(1, 95))} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(real_pictures(), st.data())
def test_damaged_pictures_decode_or_get_a_typed_error(picture: bytes, data: st.DataObject) -> None:
    """A real picture of every accepted format and mode, truncated, overwritten or spliced at random."""
    damage = data.draw(st.sampled_from(["none", "truncate", "overwrite", "insert"]))
    damaged = bytearray(picture)
    if damage == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(picture)))]
    elif damage == "overwrite":
        for _ in range(data.draw(st.integers(1, 8))):
            damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    elif damage == "insert":
        at = data.draw(st.integers(0, len(damaged)))
        damaged[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    assert_decodes_or_refuses(bytes(damaged))
    if damage == "none":
        assert decode_image(picture, max_pixels=MAX_PIXELS).rgb.size > 0


# --- preprocess ----------------------------------------------------------------------------------

SMALL_POLICY = InputPolicy(short_edge=64, max_long_edge=128)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 600), st.integers(1, 600), st.integers(0, 2**32 - 1))
def test_prepare_gives_the_promised_model_input(height: int, width: int, seed: int) -> None:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    tensor, meta = prepare(image, SMALL_POLICY)
    rh, rw = meta.resized_hw
    ph, pw = meta.padded_hw
    assert meta.orig_hw == (height, width)
    assert tensor.shape == (1, 3, ph, pw) and tensor.dtype == np.float32
    assert ph % 32 == 0 and pw % 32 == 0 and 0 <= ph - rh < 32 and 0 <= pw - rw < 32
    assert max(rh, rw) <= SMALL_POLICY.max_long_edge + 1
    assert min(rh, rw) <= SMALL_POLICY.short_edge + 1
    assert tensor[0, :, :rh, :rw].min() >= 0 and tensor[0, :, :rh, :rw].max() <= 255
    pad = np.asarray(SMALL_POLICY.pad_rgb, np.float32)[:, None]
    assert np.array_equal(tensor[0, :, rh:, :].reshape(3, -1), np.broadcast_to(pad, (3, (ph - rh) * pw)))
    assert np.array_equal(tensor[0, :, :, rw:].reshape(3, -1), np.broadcast_to(pad, (3, ph * (pw - rw))))


# --- postprocess ---------------------------------------------------------------------------------

INFERENCE = InferenceSettings()
CLASSES = [f"class{i}" for i in range(INFERENCE.num_parsing)] + ["human"]
LOGIT = st.floats(-40, 40, width=32)
ANY_FLOAT = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def raw_outputs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, PreprocessMeta]:
    orig = (draw(st.integers(1, 160)), draw(st.integers(1, 160)))
    resized = resized_hw(orig, SMALL_POLICY.short_edge, SMALL_POLICY.max_long_edge)
    padded = padded_hw(resized, SMALL_POLICY.size_divisibility)
    queries = draw(st.integers(1, 12))
    elements = draw(st.sampled_from([LOGIT, ANY_FLOAT]))
    class_logits = draw(hnp.arrays(np.float32, (queries, len(CLASSES) + 1), elements=elements))
    mask_logits = draw(hnp.arrays(np.float32, (queries, padded[0] // 4, padded[1] // 4), elements=elements))
    for q in draw(st.sets(st.integers(0, queries - 1))):  # confident queries: a class and a mask region
        class_logits[q, draw(st.sampled_from([INFERENCE.human_class_index, *range(1, INFERENCE.num_parsing)]))] = 30
        h, w = mask_logits.shape[1:]
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        mask_logits[q, y0 : y0 + draw(st.integers(1, h)), x0 : x0 + draw(st.integers(1, w))] = 12
    return class_logits, mask_logits, PreprocessMeta(orig, resized, padded)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=raw_outputs())
def test_any_raw_output_of_valid_shape_gives_a_valid_result(
    raw: tuple[np.ndarray, np.ndarray, PreprocessMeta], mode: postprocess.Mode
) -> None:
    class_logits, mask_logits, meta = raw
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        result = postprocess.to_result(class_logits, mask_logits, meta, INFERENCE, CLASSES, mode=mode)
    assert result.hw == meta.orig_hw  # ParsingResult validated the shapes and the class ids itself
    assert result.label_map.max(initial=0) < INFERENCE.num_parsing
    assert np.all((result.person_scores > INFERENCE.human_score_thr) & (result.person_scores <= 1))
    assert list(result.person_scores) == sorted(result.person_scores, reverse=True)
    assert all(0 < p.class_id < INFERENCE.num_parsing + 1 and p.score >= INFERENCE.part_score_thr
               for p in result.parts)
    event(f"people found: {min(result.num_people, 2)}+" if result.num_people else "people found: 0")
    event("label map: parts present" if result.label_map.any() else "label map: background only")
