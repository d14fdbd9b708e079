"""Pictures the exporter checks and calibrates on.

Check images are real photographs of people (scikit-image's public-domain astronaut, twice, in a
landscape and a portrait layout), so the check compares label maps and people that exist. The
built-in calibration set, used by ``--int8`` when no ``--calibration DIR`` is given, is made
deterministically from the photographs scikit-image ships (people, a cat, a cup of coffee, a
rocket, street scenes): crops, flips, scales and both orientations, at the reference input scale.
It is a stand-in: calibrate on photos like the ones you serve when you have them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from m2fp_service.imaging.preprocess import resized_hw

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# scikit-image's bundled photographs (no download): people first.
_BUILTIN = ("astronaut", "camera", "coffee", "chelsea", "rocket", "stereo_motorcycle")


def _skimage(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    return np.ascontiguousarray(np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3])


def _resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def astronaut_pair() -> np.ndarray:
    """(512, 1024, 3) uint8: the astronaut beside her mirror image (two people)."""
    a = _skimage("astronaut")
    return np.ascontiguousarray(np.concatenate([a, a[:, ::-1]], axis=1))


def check_images() -> list[np.ndarray]:
    """Two photographs of two people, landscape (480x960) and portrait (736x480), uint8 RGB.

    Sizes are multiples of 32 apart from the portrait width, differ from the trace size, and
    are small enough that the full-size PyTorch reference runs them in seconds.
    """
    pair = astronaut_pair()
    a = _skimage("astronaut")
    stacked = np.concatenate([a, a[:, ::-1]], axis=0)  # (1024, 512): portrait, two people
    return [_resize(pair, (480, 960)), _resize(stacked, (736, 460))]


def builtin_calibration(count: int = 12, short_edge: int = 448, max_long_edge: int = 800) -> list[np.ndarray]:
    """``count`` deterministic variants of the bundled photographs, resized like model inputs.

    Calibration only needs activation ranges representative of real inputs; the images are
    kept below the serving size (short edge ``short_edge``) so that calibrating the full model
    holds its intermediate tensors in memory comfortably.
    """
    rng = np.random.default_rng(0)
    sources = [astronaut_pair()] + [_skimage(n) for n in _BUILTIN]
    out = []
    for i in range(count):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        if i >= len(sources):  # second pass: a random crop of at least 60%, sometimes mirrored
            ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            img = img[y:y + ch, x:x + cw]
            if rng.random() < 0.5:
                img = img[:, ::-1]
        out.append(_resize(np.ascontiguousarray(img), resized_hw(img.shape[:2], short_edge, max_long_edge)))
    return out


def iter_image_files(directory: Path) -> Iterator[Path]:
    """Image files under ``directory`` (recursive), sorted."""
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            yield path


def calibration_from_dir(directory: Path, limit: int = 32, short_edge: int = 448,
                         max_long_edge: int = 800) -> list[np.ndarray]:
    """Up to ``limit`` photos from ``directory``, EXIF-rotated, RGB, resized like model inputs.

    Raises:
        ValueError: the folder does not exist or holds no readable image.
    """
    if not directory.is_dir():
        raise ValueError(f"calibration folder {directory} does not exist")
    out = []
    for path in iter_image_files(directory):
        try:
            with Image.open(path) as im:
                img = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except (OSError, ValueError):
            continue  # unreadable files are skipped; an empty result is the error
        out.append(_resize(img, resized_hw(img.shape[:2], short_edge, max_long_edge)))
        if len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no readable images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return out
