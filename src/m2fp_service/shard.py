"""Sharding and resuming for ``m2fp parse``: pure functions over jobs, no I/O but ``exists``.

An Indexed Kubernetes Job runs ``m2fp parse --shard I/N`` in N pods over the same image set.
Each pod lists the inputs itself, so the share must not depend on *when* the pod lists them: a
pod started an hour after another may see files the first did not. A job's shard is therefore a
stable hash of its own key (its output path relative to the output folder) modulo N, not its
position in the listing: whatever else appears or disappears, every input belongs to exactly one
shard, the N shards are disjoint and together cover every input. Shares are balanced
statistically (N = 16 over 100,000 images: 6,250 ± ~80 each), which is what matters for
large sets; within a shard, jobs are processed in sorted key order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_SHARD_RE = re.compile(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based, as Kubernetes' ``JOB_COMPLETION_INDEX``) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"shard count must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in 0..{self.count - 1} (0-based) for {self.count} shards, "
                             f"got {self.index}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` -> ``Shard(I, N)``; raises ValueError saying what is wrong with ``text``."""
    match = _SHARD_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"expected I/N with integers 0 <= I < N (e.g. 0/4), got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) that owns ``key``: SHA-256 of its UTF-8 bytes, modulo ``count``.

    Stable across processes, machines and Python versions (unlike ``hash()``).
    """
    if count < 1:
        raise ValueError(f"shard count must be at least 1, got {count}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select(jobs: Iterable[T], shard: Shard, key: Callable[[T], str]) -> list[T]:
    """The jobs ``shard`` owns, sorted by ``key``. Keys must be unique (one job per output)."""
    keyed = sorted(((key(job), job) for job in jobs), key=lambda pair: pair[0])
    keys = [k for k, _ in keyed]
    if len(set(keys)) != len(keys):
        dup = next(k for k, n in zip(keys, keys[1:], strict=False) if k == n)
        raise ValueError(f"two jobs share the key {dup!r}; shard keys must be unique")
    return [job for k, job in keyed if shard_of(k, shard.count) == shard.index]


def split_done(jobs: Sequence[T], outputs: Callable[[T], Iterable[Path]],
               exists: Callable[[Path], bool] = Path.exists) -> tuple[list[T], list[T]]:
    """``(todo, done)``: a job is done only when *every* output path it would write exists.

    This is sound only if outputs appear atomically (written under a temporary name, then
    renamed), so that an existing path is always a complete file; ``m2fp parse`` writes them so.
    A job with no outputs at all is never done.
    """
    todo: list[T] = []
    done: list[T] = []
    for job in jobs:
        paths = list(outputs(job))
        (done if paths and all(exists(p) for p in paths) else todo).append(job)
    return todo, done
