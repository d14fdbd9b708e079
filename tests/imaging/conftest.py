"""Fixtures of the imaging tests: the fused kernel, required in CI."""

from __future__ import annotations

import pytest

from m2fp_service.imaging import fused
from tests.conftest import missing_native


def require_kernel() -> fused.PostKernel:
    """The built kernel: a failure in CI, a skip elsewhere when it is missing."""
    built = fused.built()
    if built is None:
        missing_native(str(fused.BUILT))
    return built


@pytest.fixture(scope="module")
def kernel() -> fused.PostKernel:
    return require_kernel()
