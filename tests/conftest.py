"""Session fixtures: a tiny M2FP built through the real exporter, and a real photograph.

The tiny model is the real M2FP code (ModelScope's class, our exporter, ONNX Runtime) at a
fraction of the width, with untrained weights made confident (see ``m2fp_export.confident``),
so every test sees several classes and several people, not an empty result.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from m2fp_export.convert import ExportOptions, export_model
    from m2fp_export.source import random_init

    path = tmp_path_factory.mktemp("models") / "tiny.onnx"
    export_model(random_init("tiny", seed=TINY_SEED, confident=True), path, ExportOptions(), report=lambda _: None)
    return path


@pytest.fixture(scope="session")
def engine(tiny_model_path: Path):  # type: ignore[no-untyped-def]
    from m2fp_service.engine import ParsingEngine

    return ParsingEngine(tiny_model_path)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photograph with two people: scikit-image's astronaut beside her mirror image.

    (512, 1024, 3) uint8 RGB.
    """
    from skimage import data

    astronaut = data.astronaut()
    return np.ascontiguousarray(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1))


@pytest.fixture(scope="session")
def photo_jpeg(photo: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="session")
def full_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full-size CIHP ResNet-101 architecture, confident untrained weights, exported (slow)."""
    from m2fp_export.convert import ExportOptions, export_model
    from m2fp_export.source import random_init

    path = tmp_path_factory.mktemp("models") / "full.onnx"
    export_model(random_init("cihp-r101", seed=TINY_SEED, confident=True), path, ExportOptions(),
                 report=lambda _: None)
    return path


def reference_pipeline(loaded, workdir: Path):  # type: ignore[no-untyped-def]
    """ModelScope's own ImageHumanParsingPipeline around an already built M2FP.

    The pipeline reads ``configuration.json`` from ``model.model_dir``; we write one describing
    the same model so nothing is fetched from the hub.
    """
    import json

    from modelscope.pipelines.cv.image_human_parsing_pipeline import ImageHumanParsingPipeline

    config = {"framework": "pytorch", "task": "image-segmentation",
              "pipeline": {"type": "image-human-parsing"}, "model": loaded.model_cfg}
    (workdir / "configuration.json").write_text(json.dumps(config))
    loaded.model.model_dir = str(workdir)
    return ImageHumanParsingPipeline(model=loaded.model, device="cpu")
