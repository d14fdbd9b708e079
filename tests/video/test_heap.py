"""``keep_freed_memory``: a frame loop's megabyte-sized temporaries stop taking fresh pages every frame."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from m2fp_service.video import heap

# A frame's worth of temporaries: eight 3 MB arrays alive at once, then freed (as the matte step's).
CHILD = """
import resource, sys
import numpy as np
from m2fp_service.video.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def frame():
    arrays = [np.ones(3 << 18, np.float32) for _ in range(8)]
    del arrays
frame()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    frame()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_frame(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_freed_frame_memory_is_kept_for_the_next_frame() -> None:
    default, kept = faults_per_frame("default"), faults_per_frame("keep")
    # 24 MB of 4 KB pages: by default glibc gives the freed heap back and takes it again each frame.
    assert default > 3000, f"the premise: {default} page faults per frame by default"
    assert kept < default / 20, f"{kept} page faults per frame with the thresholds set, {default} without"


def test_elsewhere_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", ""))
    assert heap.keep_freed_memory() is False
