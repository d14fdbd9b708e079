"""Colour palette for label maps.

The class names come from the model card; the palette is generated here once (the classic
PASCAL/LIP bit-interleaving palette, which CIHP tools use too) and stored in the card at export.
"""

from __future__ import annotations


def pascal_palette(n: int) -> list[tuple[int, int, int]]:
    """Returns ``n`` distinct RGB colours; index 0 is black (background)."""
    palette = []
    for label in range(n):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette
