"""``keep_freed_memory``: a frame loop's freed temporaries stay in the process for the next frame."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from m2fp_service.video import heap

# A frame's worth of temporaries: eight 3 MB arrays alive at once, then freed (as the matte step's).
# Printed: the bytes the main heap still holds from the system afterwards (glibc's mallinfo2().arena).
CHILD = """
import ctypes, sys
import numpy as np
from m2fp_service.video.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
for _ in range(3):
    arrays = [np.ones(3 << 18, np.float32) for _ in range(8)]
    del arrays
print(mallinfo2().arena)
"""
FRAME_BYTES = 8 * (3 << 20)


def heap_after_frames(mode: str) -> int:
    # The child's malloc is glibc's own, with its defaults: no preloaded allocator, no tunables.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_freed_frame_memory_is_kept_for_the_next_frame() -> None:
    default, kept = heap_after_frames("default"), heap_after_frames("keep")
    assert kept >= FRAME_BYTES, f"the heap kept {kept} bytes of a frame's {FRAME_BYTES}"
    # The premise: by default glibc hands the freed heap back to the system (and the next frame takes
    # it again, page by page: ~6000 page faults per such frame measured with 4 KB pages).
    assert default < FRAME_BYTES // 2, f"by default the heap kept {default} bytes"


def test_elsewhere_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", ""))
    assert heap.keep_freed_memory() is False
