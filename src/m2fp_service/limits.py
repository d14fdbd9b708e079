"""``ImageLimits``: the largest picture accepted (settings give it; decoding enforces it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageLimits:
    """Largest accepted picture: pixels (width x height) and longest side."""

    max_pixels: int
    max_side: int
