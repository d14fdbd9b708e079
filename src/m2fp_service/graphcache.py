"""The optimised-graph cache's files: their names (keys) and housekeeping. No onnxruntime here: the
engine passes its runtime's signature.

A cached graph is ONNX Runtime's fully optimised form of a model file, written beside it (or in
``M2FP_ORT_CACHE_DIR``) as ``.<stem>.ort-<key>.onnx``; the key hashes what the optimised graph
depends on: the model file (path, size, modification time), the runtime and CPU, and the custom-op
library registered with the rewrites it runs.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger("m2fp.engine")


def _flags_line() -> str:
    """The first ``flags`` line of ``/proc/cpuinfo`` ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    return set(_flags_line().partition(":")[2].split())


def make_shareable(path: Path) -> None:
    """Gives a ``mkstemp`` file (private to its owner) the mode a plainly created file gets: 0666 less the
    umask. The umask is read without changing it (Linux: ``/proc/self/status``): setting and restoring it
    would change it for every thread for a moment, and the model loads beside the server's event loop."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Umask:"))
        umask = int(line.split()[1], 8)
    except (OSError, StopIteration, IndexError, ValueError):  # no procfs: the old way
        umask = os.umask(0o022)
        os.umask(umask)
    path.chmod(0o666 & ~umask)


def cpu_signature() -> str:
    """The machine's architecture and CPU flags (``/proc/cpuinfo``; empty where there is none)."""
    return f"{platform.machine()}|{_flags_line()}"


def path_for(model_path: Path, cache_dir: Path | None, runtime: str, kernel: Path | None = None, *,
             rewrites: str) -> Path:
    """The cache file of ``model_path`` in ``cache_dir`` (default: beside the model), keyed by the
    file (size, mtime), ``runtime`` (runtime version and CPU) and the custom-op library registered
    (a graph optimised with it keeps its nodes, one optimised without it has their functions
    inlined) with ``rewrites``, the version of the graph rewrites done with it."""
    stat = model_path.stat()
    library = "none"
    if kernel is not None:
        kstat = kernel.stat()
        library = f"{kernel.resolve()}|{kstat.st_size}|{kstat.st_mtime_ns}|{rewrites}"
    key = hashlib.sha256(
        f"{model_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{runtime}|{library}".encode()
    ).hexdigest()[:16]
    folder = cache_dir if cache_dir is not None else model_path.parent
    return folder / f".{model_path.stem}.ort-{key}.onnx"


# A temporary file this old is no start's own: the rewrites' child processes time out after 600 s each.
ABANDONED_SECONDS = 3600


def drop_stale(model_path: Path, kept: Path, kernel: Path | None = None) -> None:
    """Deletes the other cache files of the model's name in ``kept``'s folder written before the last
    change of the model file or of the custom-op library ``kernel`` the ``kept`` one was made with:
    their key holds an older modification time of it, so they cannot be used again (each is as large
    as the model; a re-export, re-quantization or rebuilt library used to leave one behind every
    time). Cache files written since, under another key (CPU, runtime), are kept: another machine
    sharing the folder may use them. The name does not say which library or model path a cache was
    made with, so in a shared folder a cache made without the library (or with another build of it,
    or for another model file of the same name) before that change goes too: it is written again
    when next needed, once. A change time later than ``kept``'s own (a clock ahead) counts as
    ``kept``'s: nothing written since is deleted. Temporary files of the model's name older than
    ``ABANDONED_SECONDS`` go too."""
    try:
        changed = max(model_path.stat().st_mtime, kernel.stat().st_mtime if kernel is not None else 0.0)
        changed = min(changed, kept.stat().st_mtime)
        siblings = list(kept.parent.glob(f".{glob.escape(model_path.stem)}.ort-*.onnx"))
    except OSError:
        return
    for old in siblings:
        try:
            if old != kept and old.stat().st_mtime < changed:
                old.unlink()
                log.info("removed the stale optimised-graph cache %s", old)
        except OSError:  # gone already (another process) or not ours to delete
            continue
    # A start killed while writing leaves its temporary files (``<cache>.<random>.tmp``, and ``.tmp.int8``
    # for the INT8 rewrite of the saved graph), each as large as the model: those older than any start takes go.
    for abandoned in kept.parent.glob(f".{glob.escape(model_path.stem)}.ort-*.onnx.*.tmp*"):
        try:
            if time.time() - abandoned.stat().st_mtime > ABANDONED_SECONDS:
                abandoned.unlink()
                log.info("removed an abandoned optimised-graph file %s", abandoned)
        except OSError:
            continue
