"""``m2fp parse``: parse image files and folders, writing one result set per input."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from m2fp_service.engine import ParsingEngine
from m2fp_service.errors import ServiceError
from m2fp_service.imaging.postprocess import Mode
from m2fp_service.imaging.render import FILE_SUFFIXES
from m2fp_service.labelsets import LabelSet
from m2fp_service.limits import ImageLimits
from m2fp_service.outputs import ComposeSpec, Rendered, RenderRequest
from m2fp_service.pipeline import process
from m2fp_service.timings import Timings

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp"})


@dataclass(frozen=True)
class Job:
    """One input file and the path stem its outputs are written to."""

    source: Path
    out_stem: Path


def collect_jobs(paths: Iterable[Path], out_dir: Path) -> list[Job]:
    """Expands files and folders (recursively) into jobs with unique output stems.

    A folder's images keep their relative sub-folders under ``out_dir``; files named directly
    go to ``out_dir`` itself. Files given directly are taken whatever their suffix; inside
    folders only image suffixes are.
    """
    jobs: list[Job] = []
    taken: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            pairs: Iterator[tuple[Path, Path]] = ((p, out_dir / p.relative_to(path).with_suffix("")) for p in found)
        else:
            pairs = iter([(path, out_dir / path.stem)])
        for source, stem in pairs:
            unique, n = stem, 1
            while unique in taken:
                unique = stem.with_name(f"{stem.name}-{n}")
                n += 1
            taken.add(unique)
            jobs.append(Job(source, unique))
    return jobs


# File written per output name; people and areas go into the JSON summary (``json`` asks for both).
FILE_OUTPUTS: dict[str, str] = {"color": ".color.png", "label": ".label.png", "overlay": ".overlay.png",
                                "cutout": ".cutout.png"}
OUTPUT_KINDS = (*FILE_OUTPUTS, "people", "areas", "json")


def render_request(kinds: Iterable[str], labels: LabelSet, compose: ComposeSpec | None) -> RenderRequest:
    """The render stage's request for the CLI's ``--outputs`` kinds (plus ``composite`` with ``--background``)."""
    names = {k for k in kinds if k in FILE_OUTPUTS}
    if {"json", "people", "areas"} & set(kinds):
        names |= {"people", "areas"}
    if compose is not None:
        names.add("composite")
    return RenderRequest(outputs=frozenset(names), labels=labels, compose=compose, person_masks=False)


def summary(rendered: Rendered, source: Path, timings: Timings) -> dict[str, Any]:
    """The ``<stem>.json`` document: label set, classes present, areas and people."""
    result = rendered.result
    h, w = result.hw
    return {
        "source": str(source),
        "width": w,
        "height": h,
        "trained": result.trained,
        "classes": list(result.classes),
        "classes_present": rendered.classes_present,
        "areas": rendered.areas,
        "people": rendered.people,
        "timings_s": {k: round(v, 4) for k, v in timings.seconds.items()},
    }


def output_paths(job: Job, request: RenderRequest) -> dict[str, Path]:
    """The files a job writes for ``request``, by output name (all of them exist once the job is done)."""
    stem = job.out_stem
    paths = {name: stem.with_name(stem.name + suffix) for name, suffix in FILE_OUTPUTS.items()
             if name in request.outputs}
    if request.compose is not None:
        paths["composite"] = stem.with_name(f"{stem.name}.composite{FILE_SUFFIXES[request.compose.format]}")
    if "people" in request.outputs:
        paths["json"] = stem.with_name(f"{stem.name}.json")
    return paths


def _write(path: Path, data: bytes) -> None:
    """Writes via a temporary name and a rename, so a killed run never leaves a half file that looks done."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_outputs(job: Job, rendered: Rendered, request: RenderRequest, timings: Timings) -> list[Path]:
    job.out_stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for name, path in output_paths(job, request).items():
        if name == "json":
            data = (json.dumps(summary(rendered, job.source, timings), indent=2) + "\n").encode()
        elif name == "composite":
            assert rendered.composite is not None
            data = rendered.composite.data
        else:
            data = getattr(rendered, name)
        _write(path, data)
        written.append(path)
    return written


def run(engine: ParsingEngine, jobs: list[Job], request: RenderRequest, *, limits: ImageLimits,
        mode: Mode = "exact", background: np.ndarray | None = None, progress: bool = True,
        err: TextIO = sys.stderr) -> int:
    """Parses every job; returns the number of failed inputs (reported on ``err`` and skipped)."""
    from tqdm import tqdm

    failed = 0
    bar = tqdm(jobs, unit="img", disable=not progress or len(jobs) < 2, file=err, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.source.name[-40:], refresh=False)
        timings = Timings()
        try:
            data = job.source.read_bytes()
            rendered = process(engine, data, request, limits=limits, mode=mode, background=background,
                               timings=timings)
            write_outputs(job, rendered, request, timings)
        except (ServiceError, OSError) as exc:
            failed += 1
            message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            tqdm.write(f"skipped {job.source}: {message}", file=err)
    return failed
