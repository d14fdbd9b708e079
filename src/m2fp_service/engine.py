"""``ParsingEngine``: owns the ONNX Runtime session. With segmenter.py (the light model's sessions), the
only onnxruntime import in the package."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from m2fp_service import cancel, graphcache
from m2fp_service.config import Settings
from m2fp_service.errors import InferenceFailed, InferenceTimeout, ModelLoadError
from m2fp_service.labelsets import check_model_classes
from m2fp_service.modelcard import CARD_KEY, InputPolicy, ModelCard, ModelCardError, policy_for_profile

log = logging.getLogger("m2fp.engine")


@dataclass(frozen=True)
class RawOutputs:
    """One image's raw outputs, batch dimension removed.

    Attributes:
        class_logits: (Q, C+1) float32.
        mask_logits: (Q, Hp/4, Wp/4) float32 on the padded input.
    """

    class_logits: np.ndarray
    mask_logits: np.ndarray


def read_card(model_path: Path) -> ModelCard:
    """Reads the model card from an ONNX file's metadata (a session without graph optimisation)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return _card_of(_open(model_path, options), model_path)


def _open(model_path: Path, options: ort.SessionOptions, model: bytes | None = None) -> ort.InferenceSession:
    return open_session(model_path, options, f"model file {model_path} not found; export one with `m2fp export -o "
                        f"{model_path}` (see README: --checkpoint DIR, the ModelScope hub, or --random-init)", model)


def rewritten_graph(model_path: Path, kernel: Path | None) -> bytes | None:
    """``model_path``'s graph with the library's rewrites applied (``rewrite.apply``: Winograd
    convolutions, fused feed-forward blocks and linear layers, softmaxes; an INT8 model's feed-forward blocks
    and linear layers where the library runs them fast: AMX or AVX-512 VNNI), serialised; None without the
    kernel or when nothing qualifies.

    The rewrites run in a child process (``python -m m2fp_service.rewrite``): parsing and
    serialising a 230 MB protobuf holds the GIL for up to a second at a time, which would stall the
    server's event loop (health checks) while the model loads in the background.
    """
    if kernel is None or not model_path.is_file():
        return None
    try:
        flags = ["--int8-feedforward"] if int8_rewrites(kernel) else []
        child = subprocess.run([sys.executable, "-m", "m2fp_service.rewrite", *flags, str(model_path)],
                               capture_output=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("the graph rewrites did not run on %s (%s); running the graph as exported", model_path, exc)
        return None
    if child.returncode != 0:
        log.warning("the graph rewrites failed on %s (%s); running the graph as exported", model_path,
                    child.stderr.decode(errors="replace").strip().splitlines()[-1:] or child.returncode)
        return None
    if not child.stdout:
        return None
    log.info("%s", child.stderr.decode(errors="replace").strip())
    return child.stdout


def int8_products(kernel: Path) -> str:
    """How the library ``kernel`` runs the INT8 feed-forward and linear ops on this CPU: "amx" (AMX tiles),
    "avx512-vnni" or "generic" (plain loops, far slower than ONNX Runtime's own kernels: the engine then leaves
    those layers alone)."""
    library = ctypes.CDLL(str(kernel))
    library.m2fp_qffn_kernel.restype = ctypes.c_char_p
    return str(library.m2fp_qffn_kernel().decode())


def int8_rewrites(kernel: Path) -> bool:
    """Whether the engine applies the INT8 rewrites with the library ``kernel``: where it runs their ops fast."""
    return int8_products(kernel) != "generic"


def int8_graph_rewritten(optimised: Path, out: Path, convolutions: bool) -> int | None:
    """The INT8 rewrites of the optimised graph ONNX Runtime saved at ``optimised`` (``int8graph.py``: the
    convolutions when ``convolutions``, the group norms, the DequantizeLinear copies, the repeated masks), written to
    ``out`` (in a child process, as ``rewritten_graph``); how many nodes they replaced (0: none qualified), or None
    when it failed (a warning; ``out`` is then not to be used)."""
    command = [sys.executable, "-m", "m2fp_service.int8graph", str(optimised), str(out)]
    try:
        child = subprocess.run([*command, *([] if convolutions else ["--no-convolutions"])],
                               capture_output=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("the INT8 rewrite of the saved graph did not run (%s); ONNX Runtime's graph stays", exc)
        return None
    message = child.stderr.decode(errors="replace").strip()
    if child.returncode != 0 or not child.stdout.strip().isdigit():
        log.warning("the INT8 rewrite of the saved graph failed (%s); ONNX Runtime's graph stays",
                    message.splitlines()[-1:] or child.returncode)
        return None
    log.info("%s", message)
    return int(child.stdout)


def open_session(model_path: Path, options: ort.SessionOptions, missing: str,
                 model: bytes | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of ``model_path`` (or of ``model``, that file's graph rewritten).

    Raises:
        ModelLoadError: ``missing`` when there is no such file; ONNX Runtime's reason when it cannot load it.
    """
    if not model_path.is_file():
        raise ModelLoadError(missing)
    try:
        return ort.InferenceSession(str(model_path) if model is None else model, sess_options=options,
                                    providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc


def _card_of(session: ort.InferenceSession, model_path: Path) -> ModelCard:
    meta = session.get_modelmeta().custom_metadata_map
    if CARD_KEY not in meta:
        raise ModelLoadError(f"{model_path} has no m2fp model card; it was not written by `m2fp export`")
    try:
        return ModelCard.from_json(meta[CARD_KEY])
    except ModelCardError as exc:
        raise ModelLoadError(f"{model_path}: {exc}") from exc


@dataclass(frozen=True)
class EngineOptions:
    """How the ONNX Runtime session is set up (from ``Settings``; the defaults are measured, see README).

    Attributes:
        intra_op_threads: threads per run; 0 = ONNX Runtime's default (one per core).
        input_profile: ``modelcard.INPUT_PROFILES`` name, or None for the model card's own.
        optimized_cache: save the optimised graph once and load it on later starts.
        cache_dir: where the optimised graph goes; None = beside the model file.
        spinning: let idle intra-op threads spin (faster hand-offs; burns CPU on a shared machine).
        msda_kernel: the fused deformable-attention kernel: "auto" (the package's own build, if
            present), "off", or the path of a ``libm2fp_msda.so`` (must load).
    """

    intra_op_threads: int = 0
    input_profile: str | None = None
    optimized_cache: bool = True
    cache_dir: Path | None = None
    spinning: bool = False
    msda_kernel: str = "auto"


# The fused deformable-attention kernel, ``native/m2fp_msda.cc`` built by ``native/build.py``
# (``make native``): an ONNX Runtime custom-op library implementing the ``ai.m2fp::MSDeformAttn``
# nodes of models exported since it exists. Without it ONNX Runtime runs those nodes' ONNX
# function (standard ops, the same result within float rounding, several times slower).
BUILT_MSDA_KERNEL = Path(__file__).resolve().parent / "native" / "libm2fp_msda.so"
# The same library runs the nodes of the graph rewrites (``rewrite.py``: Winograd convolutions, fused
# feed-forward blocks and linear layers, softmaxes; an INT8 model's feed-forward blocks and linear layers where
# it runs them fast: AMX or AVX-512 VNNI), applied when a session is built with it (then kept in the optimised-graph
# cache); and an INT8 model's group norms and more, with AMX its convolutions too (``int8graph.py``), on the graph
# ONNX Runtime saved for the cache.
# Part of the cache key: change it when a rewrite's choices change, or ONNX Runtime's optimisers that the engine
# turns off (DISABLED_OPTIMIZERS).
GRAPH_REWRITES = "11"
# ONNX Runtime fusions that make our models slower (every session open_session makes). SkipLayerNormFusion
# turns a residual Add and the LayerNormalization after it into one SkipLayerNormalization node, whose CPU
# kernel took 13.6 ms against 5.0 ms for the two nodes (15120 x 256 floats, 2 threads): 6 such nodes in the
# INT8 encoder at 640 x 1152.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def msda_kernel_path(setting: str) -> Path | None:
    """The kernel library ``setting`` asks for: None for "off", or for "auto" when it is not built.

    Raises:
        ModelLoadError: a path that is not a file.
    """
    if setting == "off":
        return None
    if setting == "auto":
        return BUILT_MSDA_KERNEL if BUILT_MSDA_KERNEL.is_file() else None
    path = Path(setting)
    if not path.is_file():
        raise ModelLoadError(f"M2FP_MSDA_KERNEL={setting}: no such file (build it with `make native`, or use "
                             "'auto' or 'off')")
    return path


def engine_options(settings: Settings) -> EngineOptions:
    """The engine options a ``Settings`` asks for (threads per worker, profile, cache, spinning)."""
    return EngineOptions(intra_op_threads=settings.threads_per_worker(), input_profile=settings.input_profile,
                         optimized_cache=settings.ort_optimized_cache, cache_dir=settings.ort_cache_dir,
                         spinning=settings.ort_spinning, msda_kernel=settings.msda_kernel)


def _cpu_signature() -> str:
    """What the optimised graph depends on besides the model: ORT build and CPU instruction set.

    ORT's level-3 optimisations pick kernels and layouts (NCHWc blocks) for this CPU, so an
    optimised graph is only reused on the same ORT version and CPU flags.
    """
    return f"{ort.__version__}|{graphcache.cpu_signature()}"


def cache_path_for(model_path: Path, cache_dir: Path | None, kernel: Path | None = None) -> Path:
    """The optimised-graph cache file of ``model_path`` (``graphcache.path_for``) for this runtime and
    CPU, with the custom-op library ``kernel`` registered and the graph rewrites it runs (the INT8 ones only
    where it runs them fast, AMX or AVX-512 VNNI, the convolutions only on AMX: the CPU flags alone do not
    settle it, the OS may refuse AMX's tiles)."""
    rewrites = f"rewrites {GRAPH_REWRITES}" + (f"|int8 products {int8_products(kernel)}" if kernel is not None else "")
    return graphcache.path_for(model_path, cache_dir, _cpu_signature(), kernel, rewrites=rewrites)


def _base_options(options: EngineOptions, kernel: Path | None) -> ort.SessionOptions:
    so = session_options(options.intra_op_threads, spinning=options.spinning)
    if kernel is not None:
        so.register_custom_ops_library(str(kernel))
    return so


def _optimising_options(options: EngineOptions, kernel: Path | None) -> ort.SessionOptions:
    """Session options that optimise the graph fully (ONNX Runtime's every level)."""
    so = _base_options(options, kernel)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def usable_msda_kernel(setting: str) -> Path | None:
    """The kernel library to register for ``setting`` ("auto", "off" or a path), after checking it.

    It must be this project's library (its ``m2fp_msda_abi`` symbol) and register in ONNX Runtime.
    One asked for by path that fails either raises; the package's own build ("auto") that fails
    (built for another machine or runtime) is skipped with a warning: standard ops then.

    Raises:
        ModelLoadError: a path that is missing, not this library, or does not load.
    """
    kernel = msda_kernel_path(setting)
    if kernel is None:
        return None
    try:
        if ctypes.CDLL(str(kernel)).m2fp_msda_abi() != 9:
            raise OSError("an incompatible build of libm2fp_msda (ABI version mismatch)")
        ort.SessionOptions().register_custom_ops_library(str(kernel))
    except Exception as exc:  # OSError/AttributeError from ctypes, onnxruntime's own exception types
        if setting != "auto":
            raise ModelLoadError(f"ONNX Runtime cannot load the kernel library {kernel}: {exc}") from exc
        log.warning("the fused deformable-attention kernel %s does not load (%s); using standard ops. "
                    "Rebuild it with `make native`.", kernel, exc)
        return None
    return kernel


def session_options(intra_op_threads: int, *, spinning: bool = False) -> ort.SessionOptions:
    """The service's ONNX Runtime session settings (M2FP and the light model): sequential, one
    inter-op thread, ``intra_op_threads`` per run (0 = one per core), no spinning unless asked."""
    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    # The arena keeps peak-size buffers between runs (fast for repeated sizes); input sizes vary
    # per image, so a run of a new size lets it shrink back afterwards (ParsingEngine.run).
    so.enable_cpu_mem_arena = True
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # ONNX Runtime's own warnings go to stderr as plain text, which would break the JSON logs (e.g.
    # "Serializing optimized model ... hardware specific" when the optimised-graph cache is written:
    # expected, the cache is keyed by the CPU's flags). Errors still reach our log as exceptions.
    so.log_severity_level = 3
    return so


def saved_graph_options(options: EngineOptions, kernel: Path | None) -> ort.SessionOptions:
    """Session options for a graph ONNX Runtime optimised and saved earlier: not optimised again. Nor does ONNX
    Runtime give each reader of a DequantizeLinear its own copy again (EnsureUniqueDQForNodeUnit, which runs even
    with the optimisers off unless QDQ handling is off): the saved graph had them already, and ``qdedupe`` took out
    the copies of an INT8 model's that only cost time."""
    so = _base_options(options, kernel)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def _open_saved(optimised: Path, options: EngineOptions, kernel: Path | None) -> ort.InferenceSession:
    """A session of a graph ONNX Runtime optimised and saved earlier."""
    so = saved_graph_options(options, kernel)
    return ort.InferenceSession(str(optimised), sess_options=so, providers=["CPUExecutionProvider"])


def _with_int8_rewrites(session: ort.InferenceSession, optimised: Path, options: EngineOptions,
                        kernel: Path | None) -> tuple[ort.InferenceSession, bool]:
    """``session`` of the graph ONNX Runtime optimised and saved at ``optimised``; for an INT8 model where the
    library runs AMX or AVX-512 VNNI, a session of that graph rewritten (``int8_graph_rewritten``: its group norms,
    DequantizeLinear copies and repeated masks, and with AMX its convolutions, as the library's ops), which then
    replaces the file. Should its graph not open (or not take the file's place), ONNX Runtime's graph and session
    stay (a warning), as when it fails to run the warm-up picture (a rewrite that took a graph its op refuses at run
    time: every request would fail). While the second session opens, both are in memory (the bench INT8
    model's start peaked at 446 MB against 414 without). Returns the session and whether the file may be cached:
    not when the rewrite itself failed (a timeout, a killed child: the next start tries again)."""
    products = int8_products(kernel) if kernel is not None else "generic"
    card = _card(session)
    if products == "generic" or card is None or card.exporter.get("precision") != "int8":
        return session, True
    rewritten = optimised.with_name(optimised.name + ".int8")
    try:
        count = int8_graph_rewritten(optimised, rewritten, convolutions=products == "amx")
        if not count:
            return session, count is not None
        try:
            faster = _open_saved(rewritten, options, kernel)
            faster.run(None, {card.input_policy.input_name: warm_input(card.input_policy)})
            rewritten.replace(optimised)
        except Exception as exc:  # onnxruntime raises its own exception types; OSError from the file
            log.warning("the rewritten INT8 graph does not load or run (%s); ONNX Runtime's stays", exc)
            return session, True
        return faster, True
    finally:
        rewritten.unlink(missing_ok=True)


def _card(session: ort.InferenceSession) -> ModelCard | None:
    """The model card in ``session``'s metadata (None when it is missing or unreadable: the engine says why later)."""
    try:
        return _card_of(session, Path())
    except ModelLoadError:
        return None


def warm_input(policy: InputPolicy) -> np.ndarray:
    """A small all-zero input the model takes (4 x size_divisibility square): one run selects kernels and allocates."""
    div = policy.size_divisibility
    return np.zeros((1, 3, 4 * div, 4 * div), np.float32)


def _open_optimized(model_path: Path, options: EngineOptions,
                    kernel: Path | None) -> tuple[ort.InferenceSession, str]:
    """A fully optimised session, through the on-disk cache when it can be used.

    Returns:
        ``(session, how)``: how = "cache hit", "cache written" (then served from the saved file), "cache written
        but unusable" (the saved file did not load: optimised in memory, an INT8 model without the rewrites of
        its saved graph), or why no cache was used.
    """
    so = _optimising_options(options, kernel)
    if not options.optimized_cache:
        return _open(model_path, so, rewritten_graph(model_path, kernel)), "cache off"
    if not model_path.is_file():
        return _open(model_path, so), "no model"
    cached = cache_path_for(model_path, options.cache_dir, kernel)
    if cached.is_file():
        try:
            return _open_saved(cached, options, kernel), "cache hit"
        except Exception as exc:  # a damaged cache file is rebuilt, never fatal
            log.warning("optimised-graph cache %s unusable (%s); rebuilding it", cached, exc)
            cached.unlink(missing_ok=True)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=cached.name + ".", suffix=".tmp", dir=cached.parent)
        os.close(fd)
    except OSError as exc:
        log.warning("cannot write the optimised-graph cache in %s (%s): optimising in memory at every start, and "
                    "an INT8 model's convolutions and group norms stay ONNX Runtime's; set M2FP_ORT_CACHE_DIR to a "
                    "writable folder to start faster", cached.parent, exc.strerror)
        return _open(model_path, so, rewritten_graph(model_path, kernel)), f"cache not writable: {cached.parent}"
    tmp = Path(tmp_name)
    try:
        so.optimized_model_filepath = str(tmp)
        session, cacheable = _with_int8_rewrites(_open(model_path, so, rewritten_graph(model_path, kernel)), tmp,
                                                 options, kernel)
        if not cacheable:
            return session, "cache not written: the INT8 rewrite of the saved graph failed"
        graphcache.make_shareable(tmp)  # (after the file's last change) the cache is as shareable as the model
        tmp.replace(cached)
    finally:
        tmp.unlink(missing_ok=True)
    graphcache.drop_stale(model_path, cached, kernel)
    # The session that optimised the graph keeps what optimising it took (the graph as loaded, ONNX Runtime's
    # copies of it): the bench FP32 model's process held ~0.45 GB more after two 736 x 1280 runs than one that
    # opened the saved graph, for as long as it lived. So the first start, too, serves the graph from the file.
    del session
    try:
        return _open_saved(cached, options, kernel), "cache written"
    except Exception as exc:  # the file just written: never expected, never fatal
        log.warning("the optimised graph just saved to %s does not load (%s); optimising in memory (an INT8 "
                    "model's convolutions and group norms stay ONNX Runtime's)", cached, exc)
        cached.unlink(missing_ok=True)
        return (_open(model_path, _optimising_options(options, kernel), rewritten_graph(model_path, kernel)),
                "cache written but unusable")


class ParsingEngine:
    """One ONNX Runtime CPU session, set up deliberately and warmed up once.

    ``run`` is safe to call from several threads (ONNX Runtime sessions are); each call uses
    ``intra_op_threads`` threads. ``card.input_policy`` is the policy this engine serves (the
    model card's, or the input profile chosen in ``options``).
    """

    def __init__(self, model_path: Path, intra_op_threads: int = 0, warmup: bool = True,
                 options: EngineOptions | None = None) -> None:
        options = options or EngineOptions(intra_op_threads=intra_op_threads)
        t0 = time.perf_counter()
        self.model_path = model_path
        self.options = options
        kernel = usable_msda_kernel(options.msda_kernel)
        try:
            self.session, self.cache_status = _open_optimized(model_path, options, kernel)
        except ModelLoadError as exc:
            if kernel is None or options.msda_kernel != "auto" or not model_path.is_file():
                raise
            # "auto" promises a fallback: a session that fails only with the kernel opens without it.
            log.warning("the model does not load with the fused kernel (%s); using standard ops", exc)
            kernel = None
            self.session, self.cache_status = _open_optimized(model_path, options, kernel)
        self.msda_kernel = kernel
        card = _card_of(self.session, model_path)  # the optimised graph keeps the metadata
        # "fused": the model's MSDeformAttn nodes run as the kernel; "standard": as ONNX ops (no
        # kernel, or a model exported before the nodes existed).
        self.deformable_attention = "fused" if kernel is not None and card.exporter.get("msda_op") else "standard"
        # What the graph rewrites replaced (their counts, the rewrite modules' METADATA_KEY, kept in the optimised
        # graph; a cache hit does not import the rewrites): 3x3 convolutions running as Winograd F(4x4, 3x3),
        # feed-forward blocks, linear layers, softmaxes, INT8 convolutions and group norms running as the library's
        # ops.
        meta = self.session.get_modelmeta().custom_metadata_map
        counts = [meta.get(key, "0") for key in ("m2fp_winograd", "m2fp_feedforward", "m2fp_qfeedforward",
                                                 "m2fp_linear", "m2fp_qlinear", "m2fp_softmax", "m2fp_qconv",
                                                 "m2fp_qgroupnorm", "m2fp_posembed")]
        (winograd, feedforward, int8_feedforward, linear, int8_linear, softmax, int8_convolutions, int8_norms,
         embeddings) = (int(c) if c.isdigit() and kernel is not None else 0 for c in counts)
        self.winograd_convolutions, self.softmax_nodes, self.position_embeddings = winograd, softmax, embeddings
        self.int8_convolutions, self.int8_group_norms = int8_convolutions, int8_norms
        self.feedforward_blocks = feedforward + int8_feedforward  # float and INT8 ones alike
        self.linear_layers = linear + int8_linear
        try:  # every label set is defined on CIHP's classes
            check_model_classes(card.parsing_classes)
        except ValueError as exc:
            raise ModelLoadError(f"{model_path}: {exc}") from None
        if options.input_profile is not None and options.input_profile != card.input_policy.profile:
            try:
                card = replace(card, input_policy=policy_for_profile(card.input_policy, options.input_profile))
            except ModelCardError as exc:
                raise ModelLoadError(str(exc)) from exc
        self.card = card
        self._input = self.card.input_policy.input_name
        names = {o.name for o in self.session.get_outputs()}
        if not {"class_logits", "mask_logits"} <= names or self._input not in {
            i.name for i in self.session.get_inputs()
        }:
            raise ModelLoadError(f"{model_path} lacks the input/outputs the card promises: outputs {sorted(names)}")
        self.load_seconds = time.perf_counter() - t0
        log.info("session ready in %.2f s (optimised graph: %s; deformable attention: %s; Winograd convolutions: %d; "
                 "fused feed-forward blocks: %d; fused linear layers: %d; softmaxes: %d; INT8 convolutions on AMX "
                 "tiles: %d; INT8 group norms: %d; position embeddings: %d)", self.load_seconds, self.cache_status,
                 self.deformable_attention, self.winograd_convolutions, self.feedforward_blocks, self.linear_layers,
                 self.softmax_nodes, self.int8_convolutions, self.int8_group_norms, self.position_embeddings)
        self.warm = False
        self._arena_lock = threading.Lock()  # guards the two below (see run)
        self._last_shape: tuple[int, ...] | None = None  # the last run's input shape
        self._runs_in_flight = 0
        if warmup:
            self.warm_up()

    @property
    def precision(self) -> str:
        """``fp32`` or ``int8``, from the model card."""
        return str(self.card.exporter.get("precision", "fp32"))

    def warm_up(self) -> None:
        """One small run so the first request does not pay for kernel selection and allocation."""
        self.run(warm_input(self.card.input_policy))
        self.warm = True

    def run(self, tensor: np.ndarray) -> RawOutputs:
        """Runs the model on a (1, 3, Hp, Wp) float32 tensor from ``preprocess.prepare``.

        Each run has its own ``RunOptions``, so cancelling the calling job's ``CancelToken``
        (a timed-out request) terminates this run at its next node and frees the thread.

        Raises:
            InferenceTimeout: the job was cancelled before or during the run.
            InferenceFailed: ONNX Runtime rejected the input or failed.
        """
        options = ort.RunOptions()
        with self._arena_lock:
            # The arena goes back to the system after a run whose input size differs from the run
            # before, or that starts while another runs (workers > 1: two runs' buffers): sizes vary
            # per photo, and the arena would otherwise keep every size's peak. Repeated sizes (video
            # frames, a camera, a batch of one size) keep it, and the next run skips re-touching it:
            # ~80k page faults (~300 MB) per INT8 720p run, 4% of the run here.
            if tensor.shape != self._last_shape or self._runs_in_flight:
                options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
            self._last_shape = tensor.shape
            self._runs_in_flight += 1
        try:
            return self._run_cancellable(tensor, options)
        finally:
            with self._arena_lock:
                self._runs_in_flight -= 1

    def _run_cancellable(self, tensor: np.ndarray, options: ort.RunOptions) -> RawOutputs:
        # A failing or terminated run would print ONNX Runtime's own line on stderr (breaking the
        # JSON logs); its error reaches our log, with the request id, through the exception.
        options.log_severity_level = 4
        token = cancel.current()
        if token is None:
            return self._run(tensor, options)

        def terminate() -> None:
            options.terminate = True

        failure: InferenceFailed | None = None
        with token.on_cancel(terminate):
            if not token.cancelled:
                try:
                    return self._run(tensor, options)
                except InferenceFailed as exc:
                    if not token.cancelled:
                        raise
                    failure = exc
        raise InferenceTimeout(f"inference stopped: {token.reason}", detail=failure.detail if failure else None)

    def _run(self, tensor: np.ndarray, options: ort.RunOptions) -> RawOutputs:
        try:
            class_logits, mask_logits = self.session.run(
                ["class_logits", "mask_logits"], {self._input: tensor}, options
            )
        except Exception as exc:
            raise InferenceFailed(
                f"the model failed on this image (ONNX Runtime error, {tensor.shape[2]}x{tensor.shape[3]} input)",
                detail=f"{type(exc).__name__}: {exc}",
            ) from exc
        return RawOutputs(class_logits=class_logits[0], mask_logits=mask_logits[0])
