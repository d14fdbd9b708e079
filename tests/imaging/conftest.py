"""Fixtures of the imaging tests: the fused kernel, required in CI."""

from __future__ import annotations

import os
import platform
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from m2fp_export.quantize import cpu_flags
from m2fp_service.imaging import fused
from tests.conftest import missing_native


def require_kernel() -> fused.PostKernel:
    """The built kernel: a failure in CI, a skip elsewhere when it is missing."""
    built = fused.built()
    if built is None:
        missing_native(str(fused.BUILT))
    return built


# Another build of the library to test instead of the package's (test_fused.py's narrower builds).
LIBRARY_UNDER_TEST = "M2FP_TEST_POST_LIBRARY"


@pytest.fixture(scope="module")
def kernel() -> fused.PostKernel:
    if os.environ.get(LIBRARY_UNDER_TEST):
        return fused.PostKernel(Path(os.environ[LIBRARY_UNDER_TEST]))
    return require_kernel()


def cpu_lanes() -> int:
    """The vector width of the per-pixel kernels the package's build should run on this CPU."""
    flags = cpu_flags() if platform.machine() == "x86_64" else set()
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2"} <= flags:
        return 16
    return 8 if {"avx2", "fma", "bmi2"} <= flags else 4


def assert_tests_pass_on_a_build_for(march: str, directory: Path, test_file: str, *pytest_args: str) -> None:
    """The library built for one x86-64 level alone (``-DM2FP_CLONES= -march=...``: one width, from the
    command line's target, the per-level files empty) passes ``test_file``'s tests in a child process."""
    build = runpy.run_path(str(Path(__file__).parents[2] / "native" / "build.py"))
    library = directory / f"libm2fp_post-{march}.so"
    subprocess.run([os.environ.get("CC", "cc"), *build["POST_FLAGS"], f"-march={march}", "-DM2FP_CLONES=",
                    *map(str, build["POST_SOURCES"]), "-o", str(library)], check=True)
    child = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", *pytest_args],
                           env={**os.environ, LIBRARY_UNDER_TEST: str(library)}, capture_output=True, text=True,
                           check=False)
    assert child.returncode == 0, child.stdout[-3000:]
    assert " passed" in child.stdout and " failed" not in child.stdout
