"""``m2fp parse``: files and folders, one result set per input, failures reported and counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def inputs(tmp_path: Path, photo: np.ndarray) -> Path:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(photo).save(root / "two.jpg", quality=90)
    Image.fromarray(photo[:, :512]).save(root / "sub" / "one.png")
    Image.fromarray(photo[:, 512:]).save(root / "sub" / "two.webp")  # same stem as two.jpg elsewhere
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "notes.txt").write_text("not an image, not picked up from a folder")
    return root


def _run(*args: str, env_model: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ)
    if env_model:
        env["M2FP_MODEL"] = str(env_model)
    return subprocess.run([sys.executable, "-m", "m2fp_service.cli", "parse", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_parse_folder(inputs: Path, tmp_path: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(str(inputs), "-o", str(out), env_model=tiny_model_path)
    assert proc.returncode == 1, proc.stderr  # broken.jpg failed
    assert "UNTRAINED" in proc.stderr
    assert "skipped" in proc.stderr and "broken.jpg" in proc.stderr
    assert "parsed 3 of 4 inputs" in proc.stderr
    for stem in ("two", "sub/one", "sub/two"):
        for suffix in (".color.png", ".label.png", ".overlay.png", ".json"):
            assert (out / f"{stem}{suffix}").is_file(), f"{stem}{suffix}"
    label = np.asarray(Image.open(out / "two.label.png"))
    assert label.ndim == 2 and label.shape == (512, 1024) and label.max() < 20
    doc = json.loads((out / "two.json").read_text())
    assert doc["trained"] is False and doc["width"] == 1024
    assert len(doc["classes_present"]) >= 5 and len(doc["people"]) >= 2
    assert sum(doc["areas"].values()) == 512 * 1024
    present = {doc["classes"][i] for i in np.unique(label)}
    assert present == set(doc["classes_present"])
    person = doc["people"][0]
    assert 0 < person["score"] <= 1 and len(person["box_xyxy"]) == 4 and person["parts"]
    color = np.asarray(Image.open(out / "two.color.png"))
    assert color.shape == (512, 1024, 3)


def test_parse_selected_outputs_and_files(inputs: Path, tmp_path: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(str(inputs / "two.jpg"), "--model", str(tiny_model_path), "-o", str(out), "--outputs", "label,json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["two.json", "two.label.png"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--outputs", "color,bogus"], 2, "--outputs takes a comma-separated subset"),
        (["--model", "/nonexistent/m.onnx"], 1, "not found; export one"),
    ],
)
def test_parse_errors(inputs: Path, tmp_path: Path, tiny_model_path: Path, args: list[str], code: int,
                      message: str) -> None:
    proc = _run(str(inputs / "two.jpg"), "-o", str(tmp_path / "o"), *args, env_model=tiny_model_path)
    assert proc.returncode == code and message in proc.stderr


def test_missing_path_fails(tmp_path: Path, tiny_model_path: Path, inputs: Path) -> None:
    proc = _run(str(inputs / "two.jpg"), str(tmp_path / "nope.jpg"), "-o", str(tmp_path / "o"),
                env_model=tiny_model_path)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    assert (tmp_path / "o" / "two.json").is_file()


def test_serving_never_imports_torch(tiny_model_path: Path) -> None:
    """`m2fp serve` builds the whole CLI (the export subcommand's options included) and loads a model:
    none of it may pull in torch or ModelScope (hundreds of MB of resident memory in every server;
    the fused-kernel change once did, through the quantizer's options)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from m2fp_service.cli import build_parser\n"
        "from m2fp_service.api.app import create_app\n"
        "from m2fp_service.engine import ParsingEngine\n"
        "build_parser().parse_args(['serve', '--model', sys.argv[1]])\n"
        "create_app\n"
        "ParsingEngine(Path(sys.argv[1]))\n"
        "print(sorted(m for m in ('torch', 'modelscope', 'onnx') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model_path)], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"
