"""The optimised-graph cache's file names and the removal of stale ones (no ONNX Runtime here)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from m2fp_service import graphcache

RUNTIME = "1.0|x86_64|flags : fpu"


def touch(path: Path, mtime: float, data: bytes = b"graph") -> Path:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def test_the_key_hashes_the_model_file_runtime_and_library(tmp_path: Path) -> None:
    """The key's format is part of every cache already on disk: pinned here."""
    model = touch(tmp_path / "m.onnx", 1_000_000, b"model")
    kernel = touch(tmp_path / "lib.so", 2_000_000, b"library")
    m, k = model.stat(), kernel.stat()
    plain = hashlib.sha256(f"{model.resolve()}|{m.st_size}|{m.st_mtime_ns}|{RUNTIME}|none".encode()).hexdigest()[:16]
    assert graphcache.path_for(model, None, RUNTIME, rewrites="r") == tmp_path / f".m.ort-{plain}.onnx"
    library = f"{kernel.resolve()}|{k.st_size}|{k.st_mtime_ns}|rewrites 4"
    fused = hashlib.sha256(f"{model.resolve()}|{m.st_size}|{m.st_mtime_ns}|{RUNTIME}|{library}".encode()).hexdigest()
    assert graphcache.path_for(model, tmp_path / "c", RUNTIME, kernel, rewrites="rewrites 4") == \
        tmp_path / "c" / f".m.ort-{fused[:16]}.onnx"


@pytest.mark.parametrize("with_kernel", [False, True])
def test_only_caches_older_than_the_model_or_library_go(tmp_path: Path, with_kernel: bool) -> None:
    model = touch(tmp_path / "m.onnx", 1000)
    kernel = touch(tmp_path / "lib.so", 2000) if with_kernel else None
    kept = touch(tmp_path / ".m.ort-000000000000000a.onnx", 5000)
    files = {
        "before both": (touch(tmp_path / ".m.ort-0000000000000001.onnx", 500), False),
        "between the model and the library": (touch(tmp_path / ".m.ort-0000000000000002.onnx", 1500),
                                              not with_kernel),
        "at the last change, to the second": (touch(tmp_path / ".m.ort-0000000000000003.onnx",
                                                    2000 if with_kernel else 1000), True),
        "since (another CPU's)": (touch(tmp_path / ".m.ort-0000000000000004.onnx", 3000), True),
        "another model, a longer name": (touch(tmp_path / ".m-int8.ort-0000000000000005.onnx", 500), True),
        "another model, a name with the same start": (touch(tmp_path / ".mx.ort-0000000000000006.onnx", 500), True),
        "a cache being written": (touch(tmp_path / ".m.ort-0000000000000007.onnx.x1y2.tmp", time.time() - 60), True),
        "its INT8 rewrite": (touch(tmp_path / ".m.ort-0000000000000007.onnx.x1y2.tmp.int8", time.time()),
                                    True),
        "a killed start's": (touch(tmp_path / ".m.ort-0000000000000008.onnx.a1b2.tmp", time.time() - 7200), False),
        "a killed start's rewrite": (touch(tmp_path / ".m.ort-0000000000000008.onnx.a1b2.tmp.int8",
                                           time.time() - 7200), False),
        "another model's, old": (touch(tmp_path / ".mx.ort-0000000000000009.onnx.c3d4.tmp", time.time() - 7200), True),
    }
    graphcache.drop_stale(model, kept, kernel)
    assert kept.exists() and model.exists()
    assert {name: path.exists() for name, (path, _) in files.items()} == {
        name: stays for name, (_, stays) in files.items()}


def test_a_name_with_glob_characters_matches_itself_only(tmp_path: Path) -> None:
    model = touch(tmp_path / "m[v].onnx", 1000)
    kept = touch(tmp_path / ".m[v].ort-000000000000000a.onnx", 5000)
    own = touch(tmp_path / ".m[v].ort-0000000000000001.onnx", 500)
    other = touch(tmp_path / ".mv.ort-0000000000000002.onnx", 500)
    graphcache.drop_stale(model, kept)
    assert not own.exists() and other.exists() and kept.exists()


def test_a_change_time_ahead_of_the_clock_deletes_nothing_newer_than_the_new_cache(tmp_path: Path) -> None:
    model = touch(tmp_path / "m.onnx", 9000)  # e.g. unpacked from a host whose clock is ahead
    kept = touch(tmp_path / ".m.ort-000000000000000a.onnx", 5000)
    newer = touch(tmp_path / ".m.ort-0000000000000001.onnx", 6000)
    older = touch(tmp_path / ".m.ort-0000000000000002.onnx", 4000)
    graphcache.drop_stale(model, kept)
    assert newer.exists() and not older.exists()


def test_a_missing_model_or_folder_is_left_alone(tmp_path: Path) -> None:
    kept = touch(tmp_path / ".m.ort-000000000000000a.onnx", 5000)
    other = touch(tmp_path / ".m.ort-0000000000000001.onnx", 500)
    graphcache.drop_stale(tmp_path / "gone.onnx", kept)
    graphcache.drop_stale(tmp_path / "m.onnx", tmp_path / "no-folder" / ".m.ort-0.onnx")
    assert other.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_a_cache_file_gets_the_mode_a_plain_file_gets_and_the_umask_stays(tmp_path: Path, umask: int) -> None:
    """``make_shareable``: a private ``mkstemp`` file -> 0666 less the umask, read without setting it."""
    old = os.umask(umask)
    try:
        path = tmp_path / "cache"
        path.write_bytes(b"graph")
        path.chmod(0o600)
        graphcache.make_shareable(path)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
        assert os.umask(umask) == umask  # unchanged by the call
    finally:
        os.umask(old)
