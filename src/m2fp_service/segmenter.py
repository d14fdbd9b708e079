"""``PersonSegmenter``: the light per-frame person segmenter on ONNX Runtime (engine layer).

Runs MediaPipe's selfie segmentation model as exported by ``m2fp export-light``, with
MediaPipe's own pre- and post-processing: the frame is stretched to the model input by a
corner-aligned bilinear warp (what its ImageToTensorCalculator does with ``keep_aspect_ratio:
false``), scaled to 0..1, and the output probability map is resized back bilinearly. With
``engine.py`` this is the only module that imports onnxruntime.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from m2fp_service.engine import open_session, session_options
from m2fp_service.errors import InferenceFailed, ModelLoadError
from m2fp_service.lightcard import LIGHT_CARD_KEY, LightCardError, LightModelCard


def _session_options(intra_op_threads: int, optimize: bool = True) -> ort.SessionOptions:
    options = session_options(intra_op_threads)
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return options


def _open(model_path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    return open_session(model_path, options, f"light model file {model_path} not found; export one with "
                        f"`m2fp export-light -o {model_path}` (or `make light-model`)")


def _card_of(session: ort.InferenceSession, model_path: Path) -> LightModelCard:
    meta = session.get_modelmeta().custom_metadata_map
    if LIGHT_CARD_KEY not in meta:
        raise ModelLoadError(f"{model_path} has no light model card ({LIGHT_CARD_KEY}); "
                             "it was not written by `m2fp export-light`")
    try:
        return LightModelCard.from_json(meta[LIGHT_CARD_KEY])
    except LightCardError as exc:
        raise ModelLoadError(f"{model_path}: {exc}") from exc


def read_light_card(model_path: Path) -> LightModelCard:
    """Reads the light model card from an ONNX file (a session without graph optimisation)."""
    return _card_of(_open(model_path, _session_options(1, optimize=False)), model_path)


def frame_to_input_u8(frame_rgb: np.ndarray, input_hw: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Stretches an (H, W, 3) uint8 frame to the model input size as MediaPipe does.

    The warp maps the frame's corner (0, 0) to the input's and scales each axis by
    input/frame size, bilinear, zero outside the frame: MediaPipe's ImageToTensorCalculator on
    CPU (``cv::warpPerspective`` with INTER_LINEAR, BORDER_ZERO). ``cv2.resize`` would centre
    pixels instead and move the mask by up to half an input pixel.

    Returns:
        (h, w, 3) uint8, ``out`` if given.
    """
    h, w = input_hw
    fh, fw = frame_rgb.shape[:2]
    matrix = np.array([[w / fw, 0.0, 0.0], [0.0, h / fh, 0.0]])
    return cv2.warpAffine(frame_rgb, matrix, (w, h), dst=out, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def _check_frame(frame_rgb: object) -> np.ndarray:
    if not isinstance(frame_rgb, np.ndarray) or frame_rgb.dtype != np.uint8 or frame_rgb.ndim != 3 \
            or frame_rgb.shape[2] != 3 or frame_rgb.shape[0] < 1 or frame_rgb.shape[1] < 1:
        got = (f"{frame_rgb.dtype} array of shape {frame_rgb.shape}" if isinstance(frame_rgb, np.ndarray)
               else type(frame_rgb).__name__)
        raise ValueError(f"PersonSegmenter.run takes an (H, W, 3) uint8 RGB frame, got {got}")
    return frame_rgb if frame_rgb.flags.c_contiguous else np.ascontiguousarray(frame_rgb)


class PersonSegmenter:
    """One ONNX Runtime session of the light model and the buffers of one frame.

    ``run`` and ``run_model`` may be called from several threads; calls are serialised (the
    model takes a few milliseconds; use one segmenter per thread for parallel streams).
    """

    def __init__(self, model_path: Path, intra_op_threads: int = 1) -> None:
        t0 = time.perf_counter()
        self.model_path = Path(model_path)
        self.session = _open(self.model_path, _session_options(intra_op_threads))
        self.card = _card_of(self.session, self.model_path)
        h, w = self.card.input_hw
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [self.card.input_name] or [o.name for o in outputs] != [self.card.output_name]:
            raise ModelLoadError(
                f"{self.model_path}: graph input/output {[i.name for i in inputs]} -> {[o.name for o in outputs]} "
                f"do not match the card's {self.card.input_name} -> {self.card.output_name}")
        if list(inputs[0].shape) != [1, h, w, 3] or list(outputs[0].shape) != [1, h, w, 1]:
            raise ModelLoadError(f"{self.model_path}: graph shapes {inputs[0].shape} -> {outputs[0].shape} do not "
                                 f"match the card's input size {h}x{w}")
        self.input_hw = (h, w)
        pre = self.card.preprocessing
        self._scale, self._offset = np.float32(pre.scale), np.float32(pre.offset)
        # Preallocated buffers, bound once: a call allocates only the returned mask.
        self._small = np.zeros((h, w, 3), np.uint8)
        self._input = np.zeros((1, h, w, 3), np.float32)
        self._output = np.zeros((1, h, w, 1), np.float32)
        self._binding = self.session.io_binding()
        self._binding.bind_ortvalue_input(self.card.input_name, ort.OrtValue.ortvalue_from_numpy(self._input))
        self._binding.bind_ortvalue_output(self.card.output_name, ort.OrtValue.ortvalue_from_numpy(self._output))
        self._lock = threading.Lock()
        self._infer()  # warm-up: kernel selection and arena allocation happen here, not on the first frame
        self.load_seconds = time.perf_counter() - t0

    def _infer(self) -> None:
        try:
            self.session.run_with_iobinding(self._binding)
        except Exception as exc:
            raise InferenceFailed(f"ONNX Runtime failed on the light model: {exc}") from exc

    def run_model(self, input_nhwc: np.ndarray) -> np.ndarray:
        """The raw model: (1, h, w, 3) float32 input (RGB, already normalised) -> (1, h, w, 1) float32."""
        h, w = self.input_hw
        if input_nhwc.shape != (1, h, w, 3):
            raise ValueError(f"run_model takes a (1, {h}, {w}, 3) float32 input, got shape {input_nhwc.shape}")
        with self._lock:
            np.copyto(self._input, input_nhwc, casting="same_kind")
            self._infer()
            return self._output.copy()

    def run_small(self, frame_rgb: np.ndarray) -> np.ndarray:
        """Person probability at the model's own size (what video smooths in time before upsampling).

        Args:
            frame_rgb: (H, W, 3) uint8 RGB, any size.

        Returns:
            (h, w) float32 in 0..1, ``h, w = self.input_hw`` (a new array).
        """
        frame = _check_frame(frame_rgb)
        h, w = self.input_hw
        with self._lock:
            self._infer_frame(frame)
            return self._output.reshape(h, w).copy()

    def _infer_frame(self, frame: np.ndarray) -> None:
        """MediaPipe's preprocessing into the bound input, then the model (hold the lock)."""
        frame_to_input_u8(frame, self.input_hw, out=self._small)
        np.multiply(self._small, self._scale, out=self._input[0], dtype=np.float32)
        if self._offset:
            self._input += self._offset
        self._infer()

    def run(self, frame_rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Person probability of each pixel of a frame.

        Args:
            frame_rgb: (H, W, 3) uint8 RGB, any size.
            out: optional (H, W) float32 array to write into (saves an allocation per frame).

        Returns:
            (H, W) float32 in 0..1 (``out`` if given).
        """
        frame = _check_frame(frame_rgb)
        fh, fw = frame.shape[:2]
        if out is not None and (out.shape != (fh, fw) or out.dtype != np.float32):
            raise ValueError(f"out must be a ({fh}, {fw}) float32 array, got {out.dtype} {out.shape}")
        h, w = self.input_hw
        with self._lock:
            self._infer_frame(frame)
            small_mask = self._output.reshape(h, w)
            if (fh, fw) != (h, w):
                result = cv2.resize(small_mask, (fw, fh), dst=out, interpolation=cv2.INTER_LINEAR)
            elif out is None:
                result = small_mask.copy()
            else:
                np.copyto(out, small_mask)
                result = out
        return result


class FrameSegmenter:
    """The light model for frames of any shape: the landscape variant (144 x 256) for wide frames
    (width / height >= 1.5), when it is there, else the general one (256 x 256).

    Stretching a 16:9 frame into the square input distorts people and costs twice the pixels; the
    landscape variant takes it nearly undistorted and runs about twice as fast.
    """

    WIDE = 1.5

    def __init__(self, general: Path, landscape: Path | None = None, intra_op_threads: int = 1) -> None:
        self.general = PersonSegmenter(general, intra_op_threads)
        self.landscape = (PersonSegmenter(landscape, intra_op_threads)
                          if landscape is not None and Path(landscape).is_file() else None)

    def for_frame(self, frame_hw: tuple[int, int]) -> PersonSegmenter:
        h, w = frame_hw
        if self.landscape is not None and w >= self.WIDE * h:
            return self.landscape
        return self.general

    def run_small(self, frame_rgb: np.ndarray) -> np.ndarray:
        """``PersonSegmenter.run_small`` of the variant that suits the frame."""
        return self.for_frame(frame_rgb.shape[:2]).run_small(frame_rgb)
