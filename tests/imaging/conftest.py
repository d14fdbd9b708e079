"""Fixtures of the imaging tests: the fused kernel, required in CI."""

from __future__ import annotations

import os

import pytest

from m2fp_service.imaging import fused


def require_kernel() -> fused.PostKernel:
    """The built kernel: a failure in CI, a skip elsewhere when it is missing."""
    built = fused.built()
    if built is None:
        reason = f"{fused.BUILT} is not built or does not load: build it with `make native`"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return built


@pytest.fixture(scope="module")
def kernel() -> fused.PostKernel:
    return require_kernel()
