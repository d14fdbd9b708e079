"""Post-processing's fused per-pixel kernel, ``libm2fp_post.so`` (``native/m2fp_post.c``), via ctypes.

Built by ``native/build.py`` (``make native``) beside the deformable-attention kernel. Where it is
absent (no compiler at install time) or does not load (built for another machine), post-processing
runs its OpenCV/numpy path: the same results within float rounding, slower.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BUILT = Path(__file__).resolve().parent.parent / "native" / "libm2fp_post.so"
ABI = 1  # m2fp_post_abi() of the library these signatures match

_floats = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_bytes = np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS")


class PostKernel:
    """The library's functions over C-contiguous arrays (one band of rows, or a whole map, per call).

    Raises:
        OSError: ``path`` is not a loadable library, or not this project's (another ABI).
    """

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))  # ctypes.CDLL releases the GIL during each call
        try:
            abi = lib.m2fp_post_abi
        except AttributeError as e:
            raise OSError(f"{path}: not m2fp's post-processing library (no m2fp_post_abi)") from e
        abi.restype = ctypes.c_int
        if abi() != ABI:
            raise OSError(f"{path}: ABI {abi()}, expected {ABI}; rebuild it with `make native`")
        lib.m2fp_squash.argtypes = [_floats, ctypes.c_int64, _floats, ctypes.POINTER(ctypes.c_double),
                                    ctypes.POINTER(ctypes.c_int64)]
        lib.m2fp_squash.restype = None
        lib.m2fp_add_instance.argtypes = [_floats, ctypes.c_int64, ctypes.c_float, _floats, _bytes]
        lib.m2fp_add_instance.restype = None
        lib.m2fp_average.argtypes = [_floats, _bytes, ctypes.c_int64]
        lib.m2fp_average.restype = None
        lib.m2fp_vote.argtypes = [_floats, ctypes.c_int64, ctypes.c_uint8, _floats, _bytes]
        lib.m2fp_vote.restype = None
        self.path = path
        self._lib = lib

    def squash(self, logits: np.ndarray, sig: np.ndarray) -> tuple[float, int]:
        """``sig = sigmoid(logits)``; returns (sum of ``sig`` where ``logits > 0``, how many such pixels)."""
        if logits.shape != sig.shape:
            raise ValueError(f"logits {logits.shape} and sig {sig.shape} differ")
        total, count = ctypes.c_double(), ctypes.c_int64()
        self._lib.m2fp_squash(logits, logits.size, sig, ctypes.byref(total), ctypes.byref(count))
        return total.value, count.value

    def add_instance(self, sig: np.ndarray, probs: np.ndarray, counts: np.ndarray, score: np.float32) -> None:
        """Where ``sig * score > 0.5``: ``probs += sig * score`` and ``counts += 1``."""
        if not sig.shape == probs.shape == counts.shape:
            raise ValueError(f"sig {sig.shape}, probs {probs.shape} and counts {counts.shape} differ")
        self._lib.m2fp_add_instance(sig, sig.size, score, probs, counts)

    def average(self, probs: np.ndarray, counts: np.ndarray) -> None:
        """``probs /= max(counts, 1)``, in place."""
        if probs.shape != counts.shape:
            raise ValueError(f"probs {probs.shape} and counts {counts.shape} differ")
        self._lib.m2fp_average(probs, counts, probs.size)

    def vote(self, prob: np.ndarray, class_id: int, best: np.ndarray, labels: np.ndarray) -> None:
        """Where ``prob > best``: ``best = prob`` and ``labels = class_id`` (an argmax, one class at a time)."""
        if not prob.shape == best.shape == labels.shape:
            raise ValueError(f"prob {prob.shape}, best {best.shape} and labels {labels.shape} differ")
        if not 0 <= class_id <= 255:
            raise ValueError(f"class id {class_id} does not fit a uint8 label map")
        self._lib.m2fp_vote(prob, prob.size, class_id, best, labels)


@functools.cache
def built() -> PostKernel | None:
    """The package's own build, loaded once; None when it is not built or does not load (warned)."""
    if not BUILT.is_file():
        return None
    try:
        return PostKernel(BUILT)
    except OSError as e:
        log.warning("post-processing kernel %s does not load (%s): using the OpenCV/numpy path", BUILT, e)
        return None
