"""Freed memory kept for the next frame (glibc's ``malloc`` settings for a frame loop).

A frame loop allocates the same megabyte-sized arrays every frame (the alpha, the guided filter's
products, the composed picture). glibc serves a block above its mmap threshold (which moves up to
the largest block freed, at most 32 MB) with fresh pages, and gives the top of a heap back to the
system once more than twice that threshold is free there; either way the next frame takes page
faults for the same memory again: ~2000 per 640x360 frame in the matte step, measured, about a third
of its time. Fixed thresholds of 32 MB (a block above it is mapped on its own) and 64 MB (the free
memory a heap keeps at its top) keep that memory in the process between frames, at the cost of
holding up to 64 MB more per malloc heap (one per busy thread) than it uses at a time.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("m2fp.video")

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Sets glibc's trim and mmap thresholds for a frame loop (see the module docstring) for the
    rest of the process; whether they were set (False on other C libraries). Call it before the
    process starts threads (glibc documents ``mallopt`` as not thread-safe)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The trim threshold first: setting either one turns glibc's moving thresholds off.
    done = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    done = done and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not done:
        log.warning("mallopt refused the frame loop's thresholds: frames take fresh pages each time")
    return done
