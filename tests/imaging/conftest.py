"""Fixtures of the imaging tests: the fused kernel, required in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
