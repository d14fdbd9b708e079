"""``m2fp parse --background ...``: the composed picture written beside the other outputs; bad options exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2fp_service.cli import main
from m2fp_service.labelsets import TABLES

GREEN = (0, 255, 0)


@pytest.fixture
def photo_file(tmp_path: Path, photo: np.ndarray) -> Path:
    path = tmp_path / "in" / "two.png"
    path.parent.mkdir()
    Image.fromarray(photo).save(path)
    return path


def _run(*args: str, model: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "M2FP_MODEL": str(model)}
    return subprocess.run([sys.executable, "-m", "m2fp_service.cli", "parse", "-q", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def _open(path: Path, fmt: str) -> np.ndarray:
    image = Image.open(path)
    assert image.format == fmt
    return np.asarray(image)


def test_blur_largest_atr_webp(photo_file: Path, tmp_path: Path, tiny_model_path: Path, photo: np.ndarray) -> None:
    out = tmp_path / "out"
    proc = _run(str(photo_file), "-o", str(out), "--background", "blur", "--keep", "largest", "--labels", "atr",
                "--format", "webp", model=tiny_model_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "two.color.png", "two.composite.webp", "two.json", "two.label.png", "two.overlay.png"]
    composite = _open(out / "two.composite.webp", "WEBP")
    assert composite.shape == photo.shape
    # the largest person is kept: their pixels far inside are the photo's (WebP, so nearly)
    doc = json.loads((out / "two.json").read_text())
    assert doc["classes"] == list(TABLES["atr"].classes)
    assert len(doc["people"]) >= 2
    label = _open(out / "two.label.png", "PNG")
    assert label.shape == photo.shape[:2] and int(label.max()) < len(TABLES["atr"].classes)
    # something was blurred: the picture is not the photo
    assert np.abs(composite.astype(int) - photo).mean() > 1


def test_colour_keeps_atr_upper_clothes_exactly(photo_file: Path, tmp_path: Path, tiny_model_path: Path,
                                                photo: np.ndarray) -> None:
    out = tmp_path / "out"
    proc = _run(str(photo_file), "-o", str(out), "--outputs", "label", "--background", "#00ff00", "--keep",
                "classes:upper-clothes", "--labels", "atr", "--no-refine", model=tiny_model_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["two.composite.png", "two.label.png"]
    label = _open(out / "two.label.png", "PNG")
    region = label == TABLES["atr"].classes.index("upper-clothes")
    assert 0 < region.sum() < region.size, "the tiny model must give some upper clothes"
    composite = _open(out / "two.composite.png", "PNG")
    assert composite.shape == photo.shape
    expected = np.where(region[..., None], photo, np.array(GREEN, np.uint8))
    assert (composite == expected).all()


def test_transparent_webp_only(photo_file: Path, tmp_path: Path, tiny_model_path: Path, photo: np.ndarray) -> None:
    out = tmp_path / "out"
    proc = _run(str(photo_file), "-o", str(out), "--outputs", "", "--background", "transparent", "--keep", "people:0",
                "--format", "webp", model=tiny_model_path)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == ["two.composite.webp"]
    composite = _open(out / "two.composite.webp", "WEBP")
    assert composite.shape == (*photo.shape[:2], 4)
    alpha = composite[..., 3]
    assert (alpha == 0).any() and (alpha == 255).any()


def test_image_backdrop_jpeg(photo_file: Path, tmp_path: Path, tiny_model_path: Path, photo: np.ndarray) -> None:
    backdrop = tmp_path / "beach.png"
    Image.new("RGB", (300, 300), (10, 20, 250)).save(backdrop)  # square: other aspect ratio than the photo
    out = tmp_path / "out"
    proc = _run(str(photo_file), "-o", str(out), "--outputs", "", "--background", str(backdrop), "--keep", "people:0",
                "--format", "jpeg", "--quality", "95", model=tiny_model_path)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == ["two.composite.jpg"]
    composite = _open(out / "two.composite.jpg", "JPEG")
    assert composite.shape == photo.shape
    blue = (np.abs(composite.astype(int) - (10, 20, 250)).max(axis=2) <= 12)
    assert 0.02 < blue.mean() < 0.98, "the backdrop shows around the kept person, and only there"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--background", "blur", "--keep", "people:a"], ["person ids must be numbers"]),
        (["--background", "blur", "--keep", "everyone"], ["not understood", "largest"]),
        (["--background", "blur", "--keep", "classes:glove", "--labels", "atr"], ["unknown class 'glove'", "left-arm"]),
        (["--background", "blur", "--keep", "people:\u00b2"], ["person ids must be numbers"]),
        (["--background", "transparent", "--format", "jpeg"], ["png or webp"]),
        (["--background", "#12345"], ["#12345", "hex"]),
        (["--background", "blur", "--blur", "0"], ["blur", "greater than 0"]),
        (["--background", "pixelate", "--block", "1"], ["block"]),
        (["--background", "/nonexistent/backdrop.png"], ["/nonexistent/backdrop.png"]),
        # a mistyped mode is taken for a file name: the message must still say what the choices are
        (["--background", "blurr"], ["blurr", "transparent", "blur", "pixelate", "#"]),
    ],
    ids=["keep-syntax", "keep-unknown", "keep-class-not-in-set", "keep-superscript-id", "transparent-jpeg",
         "bad-colour", "blur-zero", "block-one", "missing-backdrop", "mistyped-mode"],
)
def test_bad_options_exit_2(photo_file: Path, tmp_path: Path, args: list[str], words: list[str],
                            capsys: pytest.CaptureFixture[str]) -> None:
    # In-process: the options are refused before any model is loaded (there is none at --model: options
    # let through would end in exit 1 "not found"), so a subprocess would only add start-up time.
    out = tmp_path / "out"
    code = main(["parse", "-q", str(photo_file), "-o", str(out), "--model", str(tmp_path / "none.onnx"), *args])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    for word in words:
        assert word in stderr, stderr
    assert not out.exists(), "nothing is written when the options are refused"


def test_backdrop_that_is_a_folder_exits_2(photo_file: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["parse", "-q", str(photo_file), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "none.onnx"),
                 "--background", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert str(tmp_path) in stderr


def test_backdrop_that_is_not_a_picture_exits_2(photo_file: Path, tmp_path: Path, tiny_model_path: Path) -> None:
    """An unusable backdrop is a bad option, as a missing one is: refused before any photo is parsed."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n" * 20)
    out = tmp_path / "out"
    proc = _run(str(photo_file), "-o", str(out), "--background", str(notes), model=tiny_model_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "background" in proc.stderr and "not a recognisable image" in proc.stderr
    assert not out.exists()
