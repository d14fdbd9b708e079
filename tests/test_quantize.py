"""Static INT8 export: presets, calibration sets, the check against FP32, serving the result."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2fp_export.images import builtin_calibration, calibration_from_dir, check_images
from m2fp_export.quantize import PRESETS, QuantizationConfig, QuantizationError, excluded_nodes, quantize_file
from m2fp_service.engine import EngineOptions, ParsingEngine, cache_path_for, read_card
from m2fp_service.pipeline import parse_array

QUIET = {"report": lambda _: None}
# Few small calibration images keep the test quick; the bar is lowered because the tiny fixture's
# untrained label maps are speckled noise (INT8 agrees with FP32 on ~87-90% of their pixels).
TEST_CONFIG = dataclasses.replace(PRESETS["avx2"], calibration_count=3, calibration_short_edge=256,
                                  min_label_agreement=0.5, min_person_iou=0.5)


@pytest.fixture(scope="module")
def int8_path(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8.onnx"
    quantize_file(tiny_model_path, out, TEST_CONFIG, [], **QUIET)
    return out


def test_int8_card_says_so(int8_path: Path, tiny_model_path: Path) -> None:
    card, fp32 = read_card(int8_path), read_card(tiny_model_path)
    assert card.exporter["precision"] == "int8" and fp32.exporter["precision"] == "fp32"
    q = card.exporter["quantization"]
    assert q["preset"]["name"] == "avx2" and q["preset"]["per_channel"] is True and q["calibration_images"] == 3
    check = q["check_vs_fp32"]
    assert check["trained_weights"] is False and 0.5 <= check["min_label_agreement"] < 1.0
    assert check["same_people"] is True and all(i["reference_people"] >= 2 for i in check["images"])
    assert any("INT8" in n and "untrained" in n for n in card.notes)
    assert card.classes == fp32.classes and card.source == fp32.source
    assert int8_path.stat().st_size < 0.8 * tiny_model_path.stat().st_size
    import onnx

    model = onnx.load(str(int8_path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # The deformable attention stays one node (the kernel is built by `make test`), with its function.
    assert q["msda_op_kept"] is True and card.exporter["msda_op"] == "ai.m2fp::MSDeformAttn"
    assert "MSDeformAttn" in ops and "GridSample" not in ops
    assert [(f.domain, f.name) for f in model.functions] == [("ai.m2fp", "MSDeformAttn")]


def test_quantized_matmuls_give_float_outputs_run_as_integer_products(int8_path: Path, tmp_path: Path) -> None:
    """A quantized MatMul's output is not quantized again (its bias Add is float): ONNX Runtime runs
    DequantizeLinear -> MatMul as MatMulIntegerToFloat, not QLinearMatMul + DequantizeLinear."""
    import onnx
    import onnxruntime as ort

    assert read_card(int8_path).exporter["quantization"]["preset"]["float_outputs"] == ["MatMul"]
    graph = onnx.load(str(int8_path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    quantized = [n for n in graph.node
                 if n.op_type == "MatMul" and all(producer.get(i) == "DequantizeLinear" for i in n.input)]
    assert quantized, "the encoder's MatMuls are quantized"
    assert all("QuantizeLinear" not in readers.get(n.output[0], []) for n in quantized)
    options = ort.SessionOptions()  # the file carries MSDeformAttn's function: no kernel needed
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("MatMulIntegerToFloat") == len(quantized) and "QLinearMatMul" not in ops


def test_engine_keeps_residual_adds_and_layer_norms_apart(int8_path: Path, tmp_path: Path) -> None:
    """ONNX Runtime's SkipLayerNormFusion (residual Add + LayerNormalization -> SkipLayerNormalization, a kernel
    ~3x slower on the encoder's tokens) is off in the engine's sessions, so its optimised graph has none."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "plain.onnx")
    ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    plain = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert "SkipLayerNormalization" in plain  # what the engine turns off is there to turn off

    engine = ParsingEngine(int8_path, options=EngineOptions(intra_op_threads=1, cache_dir=tmp_path / "cache"))
    assert engine.cache_status == "cache written"
    cache = cache_path_for(int8_path, tmp_path / "cache", engine.msda_kernel)
    cached = [n.op_type for n in onnx.load(str(cache)).graph.node]
    assert "SkipLayerNormalization" not in cached
    fused = plain.count("SkipLayerNormalization")
    assert cached.count("LayerNormalization") == plain.count("LayerNormalization") + fused


def test_int8_runs_without_the_kernel(int8_path: Path, photo: np.ndarray) -> None:
    fused = ParsingEngine(int8_path, options=EngineOptions(optimized_cache=False))
    plain = ParsingEngine(int8_path, options=EngineOptions(optimized_cache=False, msda_kernel="off"))
    assert (fused.deformable_attention, plain.deformable_attention) == ("fused", "standard")
    assert parse_array(plain, photo).num_people == parse_array(fused, photo).num_people >= 2


def test_int8_is_served(int8_path: Path, photo: np.ndarray) -> None:
    engine = ParsingEngine(int8_path, options=None)
    assert engine.precision == "int8"
    result = parse_array(engine, photo)
    assert result.num_people >= 2 and len(result.class_areas()) >= 5


def test_int8_below_the_bar_is_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    strict = dataclasses.replace(TEST_CONFIG, min_label_agreement=0.9999)
    lines: list[str] = []
    with pytest.raises(QuantizationError, match=r"\(first, with fewer nodes in FP32: at .*model not written"):
        quantize_file(tiny_model_path, out, strict, [], report=lines.append)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    assert sum("checking INT8" in line for line in lines) == 2  # the fallback was tried too


def test_int8_from_int8_is_refused(int8_path: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="already int8"):
        quantize_file(int8_path, tmp_path / "q.onnx", TEST_CONFIG, [], **QUIET)


def test_presets() -> None:
    assert QuantizationConfig.preset("avx2").reduce_range is True
    assert QuantizationConfig.preset("avx512-vnni").reduce_range is False
    assert QuantizationConfig.preset("auto").name in PRESETS
    with pytest.raises(ValueError, match="unknown quantization preset"):
        QuantizationConfig.preset("gpu")


def _quantized_matmuls(path: Path) -> set[str]:
    """The MatMuls of an INT8 file whose inputs are all dequantized (those quantize_static quantized)."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    return {n.name for n in graph.node
            if n.op_type == "MatMul" and all(producer.get(i) == "DequantizeLinear" for i in n.input)}


KEY_VALUE = re.compile(r"/predictor/transformer_cross_attention_layers\.\d+/multihead_attn/MatMul_[12]$")


def test_sensitive_nodes_stay_fp32(tiny_model_path: Path) -> None:
    """First attempt: the decoder stays FP32 but for its cross-attention's key and value projections; the fallback
    keeps those and the encoder's sampling offsets and attention weights too."""
    first = excluded_nodes(tiny_model_path, PRESETS["avx2"])
    assert any("/predictor/" in n for n in first) and not any("/backbone/" in n for n in first)
    assert not any("sampling_offsets" in n or "attention_weights" in n or KEY_VALUE.search(n) for n in first)
    assert any("/predictor/" in n and "multihead_attn/MatMul" in n for n in first)  # the query projection, scores...
    fallback = dataclasses.replace(PRESETS["avx2"], keep_fp32=PRESETS["avx2"].fallback_keep_fp32 or ())
    kept = excluded_nodes(tiny_model_path, fallback)
    assert any("sampling_offsets" in n for n in kept) and any("attention_weights" in n for n in kept)
    assert any(KEY_VALUE.search(n) for n in kept) and set(first) < set(kept)
    assert not any("/backbone/" in n for n in kept)


def test_attention_projections_are_quantized_when_the_model_passes(int8_path: Path) -> None:
    quantized = _quantized_matmuls(int8_path)
    layers = {n.rsplit("/", 1)[0] for n in quantized if KEY_VALUE.search(n)}  # .../multihead_attn
    assert len(layers) >= 2 and all(f"{layer}/MatMul_1" in quantized and f"{layer}/MatMul_2" in quantized
                                    for layer in layers)  # keys and values, every cross-attention layer
    assert any("sampling_offsets" in n for n in quantized) and any("attention_weights" in n for n in quantized)
    assert not any("/predictor/" in n and not KEY_VALUE.search(n) for n in quantized)
    q = read_card(int8_path).exporter["quantization"]
    assert "first_attempt" not in q and q["preset"]["keep_fp32"] == list(PRESETS["avx2"].keep_fp32)
    assert any("attention projections in INT8" in n for n in read_card(int8_path).notes)


def test_a_model_short_of_the_bar_is_quantized_again_with_the_attention_in_fp32(
        tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The untrained weights cannot fail the first attempt alone (their sampling-offset and attention-weight
    projections are zero, their decoder's residual branches too: both attempts give the same outputs), so the
    first check's label agreement is lowered on its way out; the quantization and the second check are real."""
    from m2fp_export import check

    compare, calls = check.compare, []

    def first_falls_short(*args: object, **kwargs: object) -> check.CheckReport:
        report = compare(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(report)
        if len(calls) > 1:
            return report
        return check.CheckReport(tuple(dataclasses.replace(i, label_agreement=0.25) for i in report.images))

    monkeypatch.setattr(check, "compare", first_falls_short)
    out, lines = tmp_path / "q.onnx", []
    quantize_file(tiny_model_path, out, TEST_CONFIG, [], report=lines.append)
    assert len(calls) == 2 and any("quantizing again" in line for line in lines)
    quantized = _quantized_matmuls(out)
    assert quantized and not any("/predictor/" in n or "sampling_offsets" in n or "attention_weights" in n
                                 for n in quantized)
    card = read_card(out)
    q = card.exporter["quantization"]
    assert q["first_attempt"]["min_label_agreement"] == 0.25 and "25.0000%" in q["first_attempt"]["failures"][0]
    assert q["preset"]["keep_fp32"] == list(PRESETS["avx2"].fallback_keep_fp32 or ())
    assert q["preset"]["fallback_keep_fp32"] is None
    assert q["check_vs_fp32"]["min_label_agreement"] >= TEST_CONFIG.min_label_agreement
    assert any("attention projections in FP32" in n for n in card.notes)


def test_no_second_attempt_without_a_fallback(tiny_model_path: Path, tmp_path: Path) -> None:
    strict = dataclasses.replace(TEST_CONFIG, min_label_agreement=0.9999, fallback_keep_fp32=None)
    lines: list[str] = []
    with pytest.raises(QuantizationError, match="model not written"):
        quantize_file(tiny_model_path, tmp_path / "q.onnx", strict, [], report=lines.append)
    assert sum("checking INT8" in line for line in lines) == 1


def test_builtin_calibration_is_deterministic() -> None:
    a, b = builtin_calibration(8, 256), builtin_calibration(8, 256)
    assert len(a) == 8 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(min(x.shape[:2]) == 256 and x.dtype == np.uint8 and x.shape[2] == 3 for x in a)
    assert len({x.shape for x in a}) > 2  # several sources and crops
    assert [img.shape for img in check_images()] == [(480, 960, 3), (736, 460, 3)]


def test_calibration_from_dir(tmp_path: Path) -> None:
    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "sub").mkdir()
    Image.new("L", (100, 400)).save(tmp_path / "sub" / "b.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    images = calibration_from_dir(tmp_path, short_edge=128)
    assert [i.shape for i in images] == [(128, 192, 3), (512, 128, 3)]


def test_calibration_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        calibration_from_dir(tmp_path / "absent")
    (tmp_path / "x.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no readable images"):
        calibration_from_dir(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--random-init", "--calibration", "."], "only apply to --int8"),
        (["--int8", "--from-onnx", "m.onnx", "--random-init"], "--from-onnx is a source of its own"),
        (["--int8", "--random-init", "--calibration", "/nonexistent/dir"], "does not exist"),
    ],
)
def test_cli_int8_flag_errors(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "m2fp_service.cli", "export", *args, "-o", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "x.onnx").exists()
