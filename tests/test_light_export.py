"""The light model's exporter: fetching and verifying the .tflite, the converter, the card, refusals, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tflite

from m2fp_export.errors import ExportError, ParityError
from m2fp_export.light import fetch, reference
from m2fp_export.light.export import LightExportOptions, export_light
from m2fp_export.light.tflite_to_onnx import UnsupportedModel, _same_pads, convert
from m2fp_service.cli import main
from m2fp_service.lightcard import LIGHT_CARD_KEY, LightCardError, LightModelCard
from m2fp_service.segmenter import read_light_card

QUIET = {"report": lambda _: None}


# --- fetch ---------------------------------------------------------------------------------------

def test_sources_are_the_recorded_files(light_sources) -> None:  # type: ignore[no-untyped-def]
    for variant, source in light_sources.items():
        assert source.kind == "pypi-wheel" and source.wheel.startswith(f"mediapipe-{fetch.MEDIAPIPE_VERSION}-")
        assert source.sha256 == fetch.VARIANTS[variant].sha256 == fetch.sha256_file(source.path)
        assert source.card_fields()["known"] is True and len(source.wheel_sha256) == 64


def test_cached_wheel_works_offline(light_sources, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wheel = fetch._cached_wheel(light_sources["general"].path.parent)
    assert wheel is not None
    # --wheel PATH: no pip run at all, extracted into another cache folder
    got = fetch.obtain("landscape", wheel=wheel, cache_dir=tmp_path)
    assert got.path.parent == tmp_path and got.sha256 == fetch.VARIANTS["landscape"].sha256
    # a cache folder holding the wheel is used as it is
    shutil.copy(wheel, tmp_path / wheel.name)
    assert fetch.download_wheel(tmp_path) == tmp_path / wheel.name


def test_a_corrupt_wheel_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / f"mediapipe-{fetch.MEDIAPIPE_VERSION}-x.whl"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(fetch.FetchError, match="not a mediapipe wheel"):
        fetch.obtain("general", wheel=bad, cache_dir=tmp_path)


def test_tflite_file_must_be_the_recorded_model(light_sources, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = light_sources["general"].path
    assert fetch.from_file(good, "general").kind == "file"
    with pytest.raises(fetch.FetchError, match="'general' variant: pass --variant general"):
        fetch.from_file(good, "landscape")
    corrupt = tmp_path / "corrupt.tflite"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(fetch.FetchError, match="SHA-256 .* not the recorded general model"):
        fetch.from_file(corrupt, "general")
    source = fetch.from_file(corrupt, "general", allow_unknown=True)
    assert source.card_fields()["known"] is False


def test_unreachable_registry_exits_3(tmp_path: Path) -> None:
    """The real pip against an index on a closed local port: `m2fp export-light` says so and exits 3."""
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "3"}
    out = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, "-m", "m2fp_service.cli", "export-light", "-o", str(out),
                           "--cache-dir", str(tmp_path / "cache")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "PyPI is unreachable" in proc.stderr
    assert not out.exists() and not list((tmp_path / "cache").glob("*.whl"))


# --- converter -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "kernel", "stride", "dilation", "pads"), [
    (256, 3, 2, 1, (0, 1)),   # TFLite puts the odd pixel after
    (128, 3, 1, 1, (1, 1)),
    (32, 5, 2, 1, (1, 2)),
    (9, 5, 1, 1, (2, 2)),
    (16, 1, 1, 1, (0, 0)),
    (10, 3, 1, 2, (2, 2)),    # dilated kernel spans 5
    (7, 2, 2, 1, (0, 1)),
])
def test_same_padding_as_tflite(size: int, kernel: int, stride: int, dilation: int, pads: tuple[int, int]) -> None:
    assert _same_pads(size, kernel, stride, dilation) == pads
    out = -(-size // stride)
    assert (size + sum(pads) - (kernel - 1) * dilation - 1) // stride + 1 == out


@pytest.mark.parametrize("variant", ["general", "landscape"])
def test_converted_graph(light_sources, variant: str) -> None:  # type: ignore[no-untyped-def]
    """Every op kind of the file is translated; layout transposes only at the edges; fp32 weights."""
    converted = convert(light_sources[variant].path.read_bytes())
    h, w = fetch.VARIANTS[variant].input_hw
    assert converted.input.shape == (1, h, w, 3) and converted.output.shape == (1, h, w, 1)
    pool = "AVERAGE_POOL_2D" if variant == "general" else "MEAN"
    assert converted.op_counts == {"DEQUANTIZE": 110, "CONV_2D": 43, "HARD_SWISH": 11, "RELU": 22,
                                   "DEPTHWISE_CONV_2D": 11, pool: 10, "LOGISTIC": 11, "MUL": 10, "ADD": 14,
                                   "RESIZE_BILINEAR": 3, "Convolution2DTransposeBias": 1}
    nodes = converted.model.graph.node
    kinds = [n.op_type for n in nodes]
    assert kinds.count("Transpose") == 2 and kinds[0] == kinds[-1] == "Transpose"
    assert kinds.count("ConvTranspose") == 1 and kinds.count("Conv") == 54 and kinds.count("HardSwish") == 11
    assert kinds.count("GlobalAveragePool" if variant == "general" else "ReduceMean") == 10
    resize = [n for n in nodes if n.op_type == "Resize"]
    assert len(resize) == 3 and all(
        onnx.helper.get_attribute_value(a) == b"half_pixel"
        for n in resize for a in n.attribute if a.name == "coordinate_transformation_mode")
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in converted.model.graph.initializer
               if t.name.endswith(("/W", "/B")))
    graph_input = converted.model.graph.input[0]
    assert graph_input.name == "input_1"
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, h, w, 3]


def _with_opcode(data: bytes, old: int, new: int) -> bytes:
    """A copy of a TFLite file whose operator code ``old`` is replaced by ``new`` (both fields)."""
    model = tflite.Model.GetRootAsModel(data, 0)
    patched = bytearray(data)
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == old:
            tab = code._tab
            for field, fmt in ((4, "b"), (10, "i")):  # deprecated_builtin_code int8, builtin_code int32
                off = tab.Offset(field)
                if off:
                    np.frombuffer(memoryview(patched)[tab.Pos + off:], dtype=fmt, count=1)[...] = new
    return bytes(patched)


def test_unsupported_op_is_named(light_sources) -> None:  # type: ignore[no-untyped-def]
    data = light_sources["general"].path.read_bytes()
    patched = _with_opcode(data, tflite.BuiltinOperator.HARD_SWISH, tflite.BuiltinOperator.SOFTMAX)
    with pytest.raises(UnsupportedModel, match="operator SOFTMAX .* not supported"):
        convert(patched)


@pytest.mark.parametrize("data", [b"", b"not a model at all", b"\0\0\0\0TFL3" + b"\xff" * 64])
def test_not_a_tflite_file(data: bytes) -> None:
    with pytest.raises(UnsupportedModel):
        convert(data)


# --- export, card and refusals -------------------------------------------------------------------

def test_card_round_trip(light_models: dict[str, Path], light_sources) -> None:  # type: ignore[no-untyped-def]
    for variant, path in light_models.items():
        card = read_light_card(path)
        assert card.variant == variant and card.license.startswith("Apache-2.0")
        assert card.input_hw == fetch.VARIANTS[variant].input_hw
        assert card.preprocessing.resize == "stretch" and card.preprocessing.scale == pytest.approx(1 / 255)
        assert card.source["sha256"] == fetch.VARIANTS[variant].sha256 and card.source["known"] is True
        assert card.source["package"] == f"mediapipe=={fetch.MEDIAPIPE_VERSION}"
        assert card.converter["tflite_ops"]["Convolution2DTransposeBias"] == 1
        assert card.parity["checked"] is True and card.parity["max_abs_diff"] <= card.parity["atol"]
        assert card.parity["reference"].startswith("mediapipe 1.2")
        assert {"skimage-astronaut", "matplotlib-grace_hopper"} <= set(card.parity["images"])
        assert LightModelCard.from_json(card.to_json()) == card
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["onnx_sha256"] == fetch.sha256_file(path) and sidecar["card"]["variant"] == variant
        proto = onnx.load(str(path))
        assert [p.key for p in proto.metadata_props] == [LIGHT_CARD_KEY]


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "invalid"), ('{"format": 2}', "format"),
    ('{"format": 1, "variant": "general", "input_name": "x", "output_name": "y"}', "input_hw"),
    ('{"format": 1, "variant": "portrait", "input_name": "x", "output_name": "y", "input_hw": [1, 1]}', "variant"),
])
def test_card_errors(text: str, message: str) -> None:
    with pytest.raises(LightCardError, match=message):
        LightModelCard.from_json(text)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_tflite_is_refused_and_nothing_written(light_sources, tmp_path: Path, damage: str) -> None:  # type: ignore[no-untyped-def]
    data = light_sources["general"].path.read_bytes()
    bad = tmp_path / "in" / "bad.tflite"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncate" else data[:8] + os.urandom(len(data) - 8))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    source = fetch.from_file(bad, "general", allow_unknown=True)
    with pytest.raises(ExportError):
        export_light(source, out_dir / "light.onnx", **QUIET)
    assert _leftovers(out_dir) == []


def test_parity_failure_refuses(light_sources, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A tolerance below the real difference: refused, the previous file at the path stays as it was."""
    out = tmp_path / "light.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(ParityError, match="differs from MediaPipe"):
        export_light(light_sources["general"], out, LightExportOptions(atol=1e-9), **QUIET)
    assert out.read_bytes() == b"previous" and _leftovers(tmp_path) == ["light.onnx"]


def test_cli_export_light(light_sources, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "l.onnx"
    src = light_sources["landscape"].path
    assert main(["export-light", "--variant", "landscape", "--tflite", str(src), "-o", str(out),
                 "--require-reference"]) == 0
    assert "parity vs MediaPipe" in capsys.readouterr().out
    assert read_light_card(out).variant == "landscape"
    # wrong variant for the file, bad arguments
    assert main(["export-light", "--tflite", str(src), "-o", str(tmp_path / "x.onnx")]) == 1
    assert "pass --variant landscape" in capsys.readouterr().err
    assert main(["export-light", "--atol", "0", "-o", str(tmp_path / "x.onnx")]) == 2
    assert main(["export-light", "--allow-unknown-tflite", "-o", str(tmp_path / "x.onnx")]) == 2
    assert main(["export-light", "--wheel", str(tmp_path / "missing.whl"), "-o", str(tmp_path / "x.onnx")]) == 1
    with pytest.raises(SystemExit) as exc:
        main(["export-light", "--variant", "portrait"])
    assert exc.value.code == 2
    assert not (tmp_path / "x.onnx").exists()


def test_reference_is_installed() -> None:
    """The parity tests need MediaPipe's runtime; `make install-dev` installs it (CI included)."""
    assert reference.available(), "mediapipe is missing: run `make install-dev`"
    assert reference.version().startswith("1.2")


def test_without_the_reference(light_sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A bare export environment (no mediapipe): written with a loud warning and `checked: false` in
    the card, unless the reference is required."""
    monkeypatch.setattr(reference, "available", lambda: False)
    lines: list[str] = []
    card = export_light(light_sources["general"], tmp_path / "l.onnx", report=lines.append)
    assert card.parity["checked"] is False and card.parity["reference"] is None
    assert any("NOT compared with MediaPipe" in line for line in lines)
    assert card.parity["images"]["skimage-astronaut"]["person_fraction"] > 0.3  # ours still ran on the photos
    with pytest.raises(ExportError, match="reference `mediapipe` is not installed"):
        export_light(light_sources["general"], tmp_path / "m.onnx", LightExportOptions(require_reference=True),
                     **QUIET)
    assert not (tmp_path / "m.onnx").exists()
