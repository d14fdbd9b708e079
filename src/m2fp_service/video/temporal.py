"""Temporal smoothing of the per-frame person probability.

An exponential moving average whose rate follows the change: where the new frame's probability
differs little from the running estimate (model noise on a still scene) it moves slowly, so the
edge does not flicker; where it differs a lot (the person moved) it follows at once, so a moving
hand does not leave a ghost. Runs on the model's small output (e.g. 256 x 256), before upsampling.
"""

from __future__ import annotations

import numpy as np


class AlphaSmoother:
    """Motion-adaptive EMA on an (h, w) float32 probability map.

    Args:
        rate_still: the EMA rate where nothing moved (0 < rate <= 1; 1 = no smoothing).
        motion: a change of this much (0..1) or more counts as motion: the rate becomes 1.
    """

    def __init__(self, rate_still: float = 0.3, motion: float = 0.3) -> None:
        if not 0 < rate_still <= 1 or motion <= 0:
            raise ValueError("rate_still must be in (0, 1] and motion > 0")
        self.rate_still = rate_still
        self.motion = motion
        self._state: np.ndarray | None = None

    def reset(self) -> None:
        self._state = None

    def __call__(self, prob: np.ndarray) -> np.ndarray:
        """The smoothed map for this frame (a new array; the input is not kept)."""
        if self._state is None or self._state.shape != prob.shape:
            self._state = prob.astype(np.float32, copy=True)
            return self._state.copy()
        delta = prob - self._state
        rate = np.abs(delta)
        rate *= (1.0 - self.rate_still) / self.motion
        rate += self.rate_still
        np.minimum(rate, 1.0, out=rate)
        delta *= rate
        self._state += delta
        return self._state.copy()
