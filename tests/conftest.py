"""Session fixtures: a tiny M2FP built through the real exporter, and a real photograph.

The tiny model is the real M2FP code (ModelScope's class, our exporter, ONNX Runtime) at a
fraction of the width, with untrained weights made confident (see ``m2fp_export.confident``),
so every test sees several classes and several people, not an empty result.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import NoReturn

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


def missing_native(what: str) -> NoReturn:
    """A native build the test needs is missing: a failure in CI (`make test` builds it), a skip elsewhere."""
    reason = f"{what} is not built or does not load: build it with `make native`"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def kernel_library() -> Path:
    """The built custom-op library (deformable attention, Winograd convolutions, fused feed-forward
    blocks and linear layers)."""
    from m2fp_service.engine import BUILT_MSDA_KERNEL

    if not BUILT_MSDA_KERNEL.is_file():
        missing_native(str(BUILT_MSDA_KERNEL))
    return BUILT_MSDA_KERNEL


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


# --- the light model (MediaPipe's selfie segmenter, real trained weights) -------------------------
# The mediapipe wheel is downloaded from PyPI once into a gitignored cache in the repository (CI is
# a clean machine with registry access); each session converts it again (a few seconds), through
# the real exporter with its parity check against MediaPipe's runtime.
LIGHT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "light"


@pytest.fixture(scope="session")
def light_sources():  # type: ignore[no-untyped-def]
    """variant -> TfliteSource (the verified .tflite extracted from the cached mediapipe wheel)."""
    from m2fp_export.light.fetch import VARIANTS, obtain

    return {v: obtain(v, cache_dir=LIGHT_CACHE) for v in VARIANTS}


@pytest.fixture(scope="session")
def light_models(tmp_path_factory: pytest.TempPathFactory, light_sources) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """variant -> exported light ONNX model (general 256x256, landscape 144x256)."""
    from m2fp_export.light.export import LightExportOptions, export_light

    out = tmp_path_factory.mktemp("light")
    paths = {}
    for variant, source in light_sources.items():
        paths[variant] = out / f"light-{variant}.onnx"
        export_light(source, paths[variant], LightExportOptions(require_reference=True), report=lambda _: None)
    return paths


@pytest.fixture(scope="session")
def light_model_path(light_models: dict[str, Path]) -> Path:
    return light_models["general"]


@pytest.fixture(scope="session")
def people_photos() -> dict[str, np.ndarray]:
    """Real photographs of people that installed packages ship: name -> (H, W, 3) uint8 RGB.

    scikit-image's astronaut (512x512, Eileen Collins), its cameraman (512x512, greyscale made
    RGB) and matplotlib's Grace Hopper (600x512 portrait).
    """
    import matplotlib.cbook
    from skimage import data

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        hopper = np.asarray(im.convert("RGB"))
    return {"astronaut": np.ascontiguousarray(data.astronaut()),
            "cameraman": np.ascontiguousarray(np.repeat(data.camera()[..., None], 3, axis=2)),
            "grace_hopper": hopper}


@pytest.fixture(scope="session")
def person_cutout() -> np.ndarray:
    """The astronaut's head and shoulders, 300 px tall."""
    import cv2
    from skimage import data

    astronaut = data.astronaut()[:, 60:420]  # 512 x 360: head, shoulders, the flag behind her
    return cv2.resize(astronaut, (210, 300), interpolation=cv2.INTER_AREA)
