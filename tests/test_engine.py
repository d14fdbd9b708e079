"""ParsingEngine: loading, model-card errors, runs on the real (tiny) graph."""

from __future__ import annotations

import contextvars
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

from m2fp_service import engine as engine_module
from m2fp_service.cancel import CancelToken, current_token
from m2fp_service.config import Settings
from m2fp_service.engine import (
    EngineOptions,
    ParsingEngine,
    RawOutputs,
    cache_path_for,
    engine_options,
    msda_kernel_path,
    read_card,
)
from m2fp_service.errors import InferenceTimeout, ModelLoadError
from m2fp_service.imaging.preprocess import prepare
from m2fp_service.modelcard import CARD_KEY
from m2fp_service.pipeline import Timings, parse_array, parse_image


def test_engine_loads_and_warms(engine: ParsingEngine) -> None:
    assert engine.warm and engine.card.trained is False
    assert engine.load_seconds > 0


def test_run_shapes(engine: ParsingEngine, photo: np.ndarray) -> None:
    tensor, meta = prepare(photo, engine.card.input_policy)
    raw = engine.run(tensor)
    assert raw.class_logits.shape == (100, 22)
    assert raw.mask_logits.shape == (100, meta.padded_hw[0] // 4, meta.padded_hw[1] // 4)


def test_parse_photo_is_non_trivial(engine: ParsingEngine, photo: np.ndarray) -> None:
    timings = Timings()
    result = parse_array(engine, photo, timings=timings)
    assert result.hw == photo.shape[:2]
    assert len(result.class_areas()) >= 5
    assert result.num_people >= 2
    assert result.person_masks.any(axis=(1, 2)).all()
    assert set(timings.seconds) == {"preprocess", "infer", "postprocess"}


def test_parse_image_decodes(engine: ParsingEngine, photo_jpeg: bytes) -> None:
    timings = Timings()
    image, result = parse_image(engine, photo_jpeg, max_pixels=10**7, max_side=4096, timings=timings)
    assert image.shape == (512, 1024, 3) and result.hw == (512, 1024)
    assert "decode" in timings.seconds


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "absent.onnx", "not found; export one with `m2fp export"),
        (lambda p: (p / "junk.onnx").write_bytes(b"junk") and p / "junk.onnx", "cannot load"),
    ],
)
def test_load_errors(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelLoadError, match=message):
        ParsingEngine(make(tmp_path))


def test_model_without_card_is_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(tiny_model_path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelLoadError, match="no m2fp model card"):
        read_card(bare)
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, '{"format": 1}'
    onnx.save(proto, str(bare))
    with pytest.raises(ModelLoadError, match="missing or has a malformed field"):
        ParsingEngine(bare)


def test_engine_is_thread_safe(engine: ParsingEngine, photo: np.ndarray) -> None:
    expected = parse_array(engine, photo).label_map
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: parse_array(engine, photo).label_map, range(3)))
    assert all(np.array_equal(r, expected) for r in results)


def test_large_photo_memory_is_bounded(engine: ParsingEngine) -> None:
    """A 16 MP photo (a small upload when flat): above 4 MP `exact` works at model-input size, so
    the post-processing's memory is set by the person masks and a few full-size buffers, not by
    100 full-size probability maps (several GB before)."""
    import tracemalloc

    image = np.full((4000, 4000, 3), 128, np.uint8)
    image[1000:3000, 1500:2500] = (200, 50, 50)
    tracemalloc.start()
    try:
        result = parse_array(engine, image, mode="exact")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.hw == (4000, 4000) and result.num_people >= 2 and len(result.class_areas()) >= 5
    per_person = 4000 * 4000  # one bool mask each
    assert peak < 300e6 + result.num_people * per_person, peak / 1e6


class _ShrinksSeen:
    """The engine's real session, each run's arena-shrinkage run option recorded (in the order the
    runs start); ``hold`` makes the first run wait, once in, until ``release`` is set."""

    KEY = "memory.enable_memory_arena_shrinkage"

    def __init__(self, session: object) -> None:
        self.session, self.shrinks = session, []  # type: list[bool]
        self.hold = False
        self.entered, self.release = threading.Event(), threading.Event()

    def run(self, names: list[str], feeds: dict[str, np.ndarray], options: object) -> list[np.ndarray]:
        try:
            self.shrinks.append(options.get_run_config_entry(self.KEY) == "cpu:0")  # type: ignore[attr-defined]
        except RuntimeError:  # not set
            self.shrinks.append(False)
        if self.hold:
            self.hold = False
            self.entered.set()
            assert self.release.wait(30)
        return self.session.run(names, feeds, options)  # type: ignore[attr-defined,no-any-return]


def test_the_arena_is_released_after_a_change_of_input_size_only(tiny_model_path: Path) -> None:
    """Repeated sizes (video frames) keep ONNX Runtime's arena from run to run; a run whose size
    differs from the one before releases it afterwards, so the arena never keeps several sizes' peaks."""
    eng = ParsingEngine(tiny_model_path, intra_op_threads=1, warmup=False)
    seen = _ShrinksSeen(eng.session)
    eng.session = seen  # type: ignore[assignment]
    sizes = [(64, 64), (64, 64), (64, 64), (64, 96), (64, 96), (64, 64), (96, 64)]
    for h, w in sizes:
        out = eng.run(np.zeros((1, 3, h, w), np.float32))
        assert out.mask_logits.shape[1:] == (h // 4, w // 4)
    assert seen.shrinks == [True, False, False, True, False, True, True]


def test_a_run_that_overlaps_another_releases_the_arena(tiny_model_path: Path) -> None:
    """Two runs at once (workers > 1) hold two runs' buffers: the one that starts while the other is
    in flight releases the arena after it, even at the same size, so two peaks are not kept idle."""
    eng = ParsingEngine(tiny_model_path, intra_op_threads=1, warmup=False)
    seen = _ShrinksSeen(eng.session)
    eng.session = seen  # type: ignore[assignment]
    x = np.zeros((1, 3, 64, 64), np.float32)
    eng.run(x)
    eng.run(x)
    seen.hold = True
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(eng.run, x)
        assert seen.entered.wait(30)
        eng.run(x)  # while the first is in flight
        seen.release.set()
        first.result(timeout=60)
    eng.run(x)  # alone again: kept
    assert seen.shrinks == [True, False, False, True, False]


def _cached_engine(model: Path, cache_dir: Path, **kw: object) -> ParsingEngine:
    return ParsingEngine(model, options=EngineOptions(intra_op_threads=1, cache_dir=cache_dir, **kw))  # type: ignore[arg-type]


def test_optimized_graph_cache_written_then_used(tiny_model_path: Path, tmp_path: Path, photo: np.ndarray) -> None:
    first = _cached_engine(tiny_model_path, tmp_path)
    assert first.cache_status == "cache written"
    cached = cache_path_for(tiny_model_path, tmp_path, first.msda_kernel)
    assert cached.is_file() and cached.stat().st_mode & 0o044  # as readable as the model
    assert [p for p in tmp_path.iterdir() if p != cached] == []  # no temp file left
    second = _cached_engine(tiny_model_path, tmp_path)
    assert second.cache_status == "cache hit" and second.card == first.card
    tensor, _ = prepare(photo, first.card.input_policy)
    a, b = first.run(tensor), second.run(tensor)
    np.testing.assert_array_equal(a.mask_logits, b.mask_logits)
    off = ParsingEngine(tiny_model_path, options=EngineOptions(optimized_cache=False))
    assert off.cache_status == "cache off"
    np.testing.assert_allclose(off.run(tensor).mask_logits, a.mask_logits, rtol=0, atol=1e-4)


def test_cache_key_follows_the_model_file(tiny_model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m.onnx"
    copy.write_bytes(tiny_model_path.read_bytes())
    before = cache_path_for(copy, None)
    assert before.parent == tmp_path and before.name.startswith(".m.ort-")
    os.utime(copy, ns=(1, 1))  # a re-exported model (new mtime) must not reuse the old graph
    assert cache_path_for(copy, None) != before


def test_a_new_cache_removes_the_ones_the_model_and_library_made_stale(tiny_model_path: Path, tmp_path: Path,
                                                                     kernel_library: Path) -> None:
    """Re-exporting (or rebuilding the library) leaves no model-sized cache files behind; caches
    written since, under other keys (another machine sharing the folder), and other models' stay.
    (Every case: tests/test_graphcache.py.)"""
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_model_path.read_bytes())
    changed = kernel_library.stat().st_mtime  # the library rebuilt after the model was written:
    os.utime(model, (changed - 1000, changed - 1000))

    def cache_file(name: str, age_s: float) -> Path:
        path = tmp_path / name
        path.write_bytes(b"graph")
        os.utime(path, (changed + age_s, changed + age_s))
        return path

    stale = [cache_file(".m.ort-0000000000000001.onnx", -3600),  # before both
             cache_file(".m.ort-0000000000000002.onnx", -1)]  # after the model, before the library
    other_key = cache_file(".m.ort-0000000000000003.onnx", +60)  # e.g. another CPU's, written since
    other_model = cache_file(".n.ort-0000000000000004.onnx", -3600)
    in_flight = cache_file(".m.ort-0000000000000005.onnx.x1.tmp", 0)
    os.utime(in_flight, (time.time() - 60, time.time() - 60))  # another start writing it now
    abandoned = cache_file(".m.ort-0000000000000006.onnx.x2.tmp", 0)  # a killed start's, over an hour old
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))
    engine = _cached_engine(model, tmp_path)
    assert engine.cache_status == "cache written" and engine.msda_kernel == kernel_library
    assert not any(p.exists() for p in [*stale, abandoned])
    assert other_key.exists() and other_model.exists() and in_flight.exists()
    assert cache_path_for(model, tmp_path, kernel_library).is_file()


def test_unwritable_cache_falls_back_and_says_so(tiny_model_path: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture, photo: np.ndarray) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a read-only mount behaves alike: the folder cannot be written
    with caplog.at_level(logging.WARNING, logger="m2fp.engine"):
        engine = _cached_engine(tiny_model_path, blocker / "cache")
    assert engine.cache_status.startswith("cache not writable")
    assert "M2FP_ORT_CACHE_DIR" in caplog.text
    assert parse_array(engine, photo).num_people >= 2


def test_damaged_cache_is_rebuilt(tiny_model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cached = cache_path_for(tiny_model_path, tmp_path, msda_kernel_path("auto"))
    cached.write_bytes(b"\x00 not an onnx graph")
    with caplog.at_level(logging.WARNING, logger="m2fp.engine"):
        engine = _cached_engine(tiny_model_path, tmp_path)
    assert engine.cache_status == "cache written" and "rebuilding" in caplog.text
    assert _cached_engine(tiny_model_path, tmp_path).cache_status == "cache hit"


def test_the_start_that_writes_the_cache_serves_the_saved_graph(tiny_model_path: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """As every later start does (the session that optimised the graph kept what optimising took: see the slow
    test below for the memory)."""
    opened: list[Path] = []
    open_saved = engine_module._open_saved

    def counted(path: Path, *args: object) -> object:
        opened.append(path)
        return open_saved(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "_open_saved", counted)
    engine = _cached_engine(tiny_model_path, tmp_path)
    assert engine.cache_status == "cache written"
    assert opened == [cache_path_for(tiny_model_path, tmp_path, engine.msda_kernel)]


def test_a_saved_graph_that_does_not_load_is_optimised_in_memory(tiny_model_path: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture, photo: np.ndarray,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The start that writes the cache serves the graph from the file it wrote (as later starts do); should
    that file not load, the start optimises in memory instead, says so, and leaves no cache behind."""
    def refuse(*args: object) -> None:
        raise RuntimeError("the file is unreadable")

    monkeypatch.setattr(engine_module, "_open_saved", refuse)
    with caplog.at_level(logging.WARNING, logger="m2fp.engine"):
        engine = _cached_engine(tiny_model_path, tmp_path)
    assert engine.cache_status == "cache written but unusable" and "does not load" in caplog.text
    assert not cache_path_for(tiny_model_path, tmp_path, engine.msda_kernel).exists()
    assert parse_array(engine, photo).num_people >= 2


START = """
import resource, sys
from pathlib import Path
from m2fp_service.engine import EngineOptions, ParsingEngine
engine = ParsingEngine(Path(sys.argv[1]), options=EngineOptions(intra_op_threads=2, cache_dir=Path(sys.argv[2])))
with open("/proc/self/statm") as f:
    rss = int(f.read().split()[1]) * resource.getpagesize()
print(engine.cache_status.replace(" ", "-"), rss)
"""


@pytest.mark.slow
def test_the_start_that_writes_the_cache_keeps_no_more_memory_than_one_that_reads_it(full_model_path: Path,
                                                                                     tmp_path: Path) -> None:
    """The session that optimised the graph held what optimising took (~0.5 GB more for the full-size FP32
    model, for the process's life); the first start serves the saved graph instead. Each start in its own
    process, RSS once it is ready."""
    def start() -> tuple[str, int]:
        done = subprocess.run([sys.executable, "-c", START, str(full_model_path), str(tmp_path)], capture_output=True,
                              text=True, timeout=900, check=True)
        status, rss = done.stdout.split()[-2:]
        return status, int(rss)

    (written, written_rss), (hit, hit_rss) = start(), start()
    assert (written, hit) == ("cache-written", "cache-hit")
    assert hit_rss > 200 << 20  # the model is there to be measured
    assert written_rss < hit_rss + (150 << 20), (written_rss >> 20, hit_rss >> 20)


def test_fast_input_profile(tiny_model_path: Path, tmp_path: Path, photo: np.ndarray) -> None:
    engine = _cached_engine(tiny_model_path, tmp_path, input_profile="fast")
    policy = engine.card.input_policy
    assert (policy.profile, policy.short_edge, policy.max_long_edge) == ("fast", 384, 800)
    tensor, meta = prepare(photo, policy)
    assert meta.padded_hw == (384, 768)
    result = parse_array(engine, photo)
    assert result.hw == photo.shape[:2] and result.num_people >= 1 and len(result.class_areas()) >= 3
    with pytest.raises(ModelLoadError, match="unknown input profile"):
        _cached_engine(tiny_model_path, tmp_path, input_profile="huge")


def test_engine_options_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from m2fp_service.config import Settings
    from m2fp_service.engine import engine_options

    monkeypatch.setenv("M2FP_INPUT_PROFILE", "")
    monkeypatch.setenv("M2FP_ORT_CACHE_DIR", "")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.input_profile is None and s.ort_cache_dir is None and s.ort_optimized_cache is True
    monkeypatch.setenv("M2FP_INPUT_PROFILE", "fast")
    monkeypatch.setenv("M2FP_ORT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("M2FP_ORT_SPINNING", "true")
    monkeypatch.setenv("M2FP_INTRA_OP_THREADS", "3")
    opts = engine_options(Settings(_env_file=None))  # type: ignore[call-arg]
    assert opts == EngineOptions(intra_op_threads=3, input_profile="fast", optimized_cache=True, cache_dir=tmp_path,
                                 spinning=True)
    monkeypatch.setenv("M2FP_INPUT_PROFILE", "huge")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def _run_in_job(engine: ParsingEngine, tensor: np.ndarray, token: CancelToken) -> BaseException | RawOutputs:
    """``engine.run`` as a pool job runs it: in a context carrying the job's cancel token."""
    context = contextvars.copy_context()
    context.run(current_token.set, token)
    try:
        return context.run(engine.run, tensor)
    except BaseException as exc:  # returned for the test to inspect
        return exc


def test_cancelling_the_token_terminates_a_running_inference(engine: ParsingEngine) -> None:
    """A timed-out request's ONNX Runtime run is stopped (RunOptions.terminate), not left running."""
    big = np.full((1, 3, 1344, 1344), 120, np.float32)  # several seconds on the tiny model here
    token = CancelToken()
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(_run_in_job, engine, big, token)
        time.sleep(0.3)
        assert not job.done(), "the run finished before it could be cancelled: make the input bigger"
        token.cancel("the request timed out after 0.3 s")
        outcome = job.result(timeout=60)
    assert isinstance(outcome, InferenceTimeout), outcome
    assert outcome.message == "inference stopped: the request timed out after 0.3 s"
    assert outcome.detail is not None and "terminate flag" in outcome.detail  # ONNX Runtime's own words


def test_a_cancelled_job_does_not_start_inference_and_other_runs_are_untouched(engine: ParsingEngine) -> None:
    small = np.full((1, 3, 128, 128), 120, np.float32)
    cancelled = CancelToken()
    cancelled.cancel("gone")
    outcome = _run_in_job(engine, small, cancelled)
    assert isinstance(outcome, InferenceTimeout) and outcome.detail is None
    live = _run_in_job(engine, small, CancelToken())  # its own RunOptions: not terminated by the other
    assert isinstance(live, RawOutputs) and live.class_logits.shape == (100, 22)


# --- the fused deformable-attention kernel (native/m2fp_msda.cc, `make native`) ---------------


def test_exported_model_calls_the_fused_node(tiny_model_path: Path) -> None:
    model = onnx.load(str(tiny_model_path))
    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == ("ai.m2fp", "MSDeformAttn")]
    assert nodes and [(f.domain, f.name) for f in model.functions] == [("ai.m2fp", "MSDeformAttn")]
    assert read_card(tiny_model_path).exporter["msda_op"] == "ai.m2fp::MSDeformAttn"


def test_engine_runs_the_kernel_when_built_and_standard_ops_when_off(
        tiny_model_path: Path, tmp_path: Path, photo: np.ndarray, kernel_library: Path) -> None:
    fused = _cached_engine(tiny_model_path, tmp_path)
    plain = _cached_engine(tiny_model_path, tmp_path, msda_kernel="off")
    assert (fused.deformable_attention, fused.msda_kernel) == ("fused", kernel_library)
    assert (plain.deformable_attention, plain.msda_kernel) == ("standard", None)
    # Two optimised graphs: one keeps the custom nodes, the other has their function inlined.
    assert cache_path_for(tiny_model_path, tmp_path, kernel_library) != cache_path_for(tiny_model_path, tmp_path)
    assert len(list(tmp_path.glob(".tiny.ort-*.onnx"))) == 2
    tensor, _ = prepare(photo, fused.card.input_policy)
    a, b = fused.run(tensor).mask_logits, plain.run(tensor).mask_logits
    assert np.abs(a).max() > 1.0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)  # float rounding only
    assert not np.array_equal(a, b)  # two different code paths really ran
    assert parse_array(fused, photo).num_people == parse_array(plain, photo).num_people


def test_kernel_asked_for_by_path_must_exist_and_load(tiny_model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file.*make native"):
        _cached_engine(tiny_model_path, tmp_path, msda_kernel=str(tmp_path / "missing.so"))
    garbage = tmp_path / "libgarbage.so"
    garbage.write_bytes(b"\x7fELF but not really a library")
    with pytest.raises(ModelLoadError, match="cannot load the kernel library"):
        _cached_engine(tiny_model_path, tmp_path, msda_kernel=str(garbage))


def test_another_library_by_path_is_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    """A real shared library that is not ours (no m2fp_msda_abi) is not taken for the kernel."""
    import onnxruntime

    foreign = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_shared.so"
    assert foreign.is_file()
    with pytest.raises(ModelLoadError, match="m2fp_msda_abi"):
        _cached_engine(tiny_model_path, tmp_path, msda_kernel=str(foreign))


def test_kernel_by_path_is_used(tiny_model_path: Path, tmp_path: Path, kernel_library: Path) -> None:
    engine = _cached_engine(tiny_model_path, tmp_path, msda_kernel=str(kernel_library))
    assert (engine.deformable_attention, engine.msda_kernel) == ("fused", kernel_library)


def test_a_broken_kernel_library_falls_back_with_a_warning(tiny_model_path: Path, tmp_path: Path, photo: np.ndarray,
                                                         caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "libm2fp_msda.so"
    broken.write_bytes(b"built for another runtime")
    monkeypatch.setattr(engine_module, "BUILT_MSDA_KERNEL", broken)
    with caplog.at_level(logging.WARNING, logger="m2fp.engine"):
        engine = _cached_engine(tiny_model_path, tmp_path)
    assert (engine.deformable_attention, engine.msda_kernel) == ("standard", None)
    assert "does not load" in caplog.text and "make native" in caplog.text
    assert parse_array(engine, photo).num_people >= 2


def test_auto_opens_without_the_kernel_when_only_the_kernel_session_fails(
        tiny_model_path: Path, tmp_path: Path, photo: np.ndarray, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, kernel_library: Path) -> None:
    """`auto` promises a fallback: a model that ONNX Runtime refuses only with the kernel registered
    (e.g. a future runtime whose checks the custom node fails) still opens, on standard ops."""
    real = engine_module._open_optimized

    def refuse_with_kernel(model_path: Path, options: EngineOptions, kernel: Path | None):  # type: ignore[no-untyped-def]
        if kernel is not None:
            raise ModelLoadError(f"ONNX Runtime cannot load {model_path}: simulated refusal with {kernel.name}")
        return real(model_path, options, kernel)

    monkeypatch.setattr(engine_module, "_open_optimized", refuse_with_kernel)
    with caplog.at_level(logging.WARNING, logger="m2fp.engine"):
        engine = _cached_engine(tiny_model_path, tmp_path)
    assert (engine.deformable_attention, engine.msda_kernel) == ("standard", None)
    assert "does not load with the fused kernel" in caplog.text
    assert parse_array(engine, photo).num_people >= 2
    with pytest.raises(ModelLoadError, match="simulated refusal"):  # asked for by path: no fallback
        _cached_engine(tiny_model_path, tmp_path, msda_kernel=str(kernel_library))


def test_msda_kernel_setting_reaches_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("M2FP_MSDA_KERNEL", "off")
    assert engine_options(Settings()).msda_kernel == "off"
    assert msda_kernel_path("off") is None
