"""``ParsingEngine``: owns the ONNX Runtime session. The only onnxruntime import in the package."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from m2fp_service import cancel
from m2fp_service.errors import InferenceFailed, InferenceTimeout, ModelLoadError
from m2fp_service.modelcard import CARD_KEY, ModelCard, ModelCardError

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


def _open(model_path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    if not model_path.is_file():
        raise ModelLoadError(
            f"model file {model_path} not found; export one with `m2fp export -o {model_path}` "
            "(see README: --checkpoint DIR, the ModelScope hub, or --random-init)"
        )
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
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


class ParsingEngine:
    """One ONNX Runtime CPU session, set up deliberately and warmed up once.

    ``run`` is safe to call from several threads (ONNX Runtime sessions are); each call uses
    ``intra_op_threads`` threads.
    """

    def __init__(self, model_path: Path, intra_op_threads: int = 0, warmup: bool = True) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # The arena keeps peak-size buffers between runs (fast for repeated sizes); input sizes
        # vary per image, so let it shrink back after each run instead of growing for ever.
        options.enable_cpu_mem_arena = True
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        t0 = time.perf_counter()
        self.model_path = model_path
        self.session = _open(model_path, options)
        self.card = _card_of(self.session, model_path)
        self._input = self.card.input_policy.input_name
        names = {o.name for o in self.session.get_outputs()}
        if not {"class_logits", "mask_logits"} <= names or self._input not in {
            i.name for i in self.session.get_inputs()
        }:
            raise ModelLoadError(f"{model_path} lacks the input/outputs the card promises: outputs {sorted(names)}")
        self.load_seconds = time.perf_counter() - t0
        self.warm = False
        if warmup:
            self.warm_up()

    def warm_up(self) -> None:
        """One small run so the first request does not pay for kernel selection and allocation."""
        div = self.card.input_policy.size_divisibility
        x = np.zeros((1, 3, 4 * div, 4 * div), np.float32)
        self.run(x)
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
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
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
