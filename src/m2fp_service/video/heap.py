"""Freed memory kept for the next frame (glibc's ``malloc`` settings for a frame loop).

A frame loop allocates the same megabyte-sized arrays every frame (the alpha, the guided filter's
products, the composed picture). glibc serves a block above its mmap threshold (which moves up to
the largest block freed, at most 32 MB) with fresh pages, and gives the top of its heap back to the
system once more than twice that threshold is free; either way the next frame takes page faults
for the same memory again: ~2000 per 640x360 frame in the matte step, measured, about a third of
its time. Fixed thresholds of 32 MB (allocations) and 64 MB (free memory kept per heap) keep that
memory in the process between frames; a process's use stays bounded by its own peak plus 64 MB per
heap.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("m2fp_service")

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Sets glibc's mmap and trim thresholds for a frame loop (see the module docstring) for the
    rest of the process; whether they were set (False on other C libraries)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                  TRIM_THRESHOLD_BYTES))
    if not done:
        log.warning("mallopt refused the frame loop's thresholds: frames take fresh pages each time")
    return done
