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
from m2fp_service.imaging import render
from m2fp_service.imaging.postprocess import Mode
from m2fp_service.pipeline import Timings, parse_image
from m2fp_service.result import ParsingResult

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp"})
OUTPUT_KINDS = ("color", "label", "overlay", "json")


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


def summary(result: ParsingResult, source: Path, timings: Timings) -> dict[str, Any]:
    """The ``<stem>.json`` document: classes present, areas and people."""
    h, w = result.hw
    areas = result.class_areas()
    return {
        "source": str(source),
        "width": w,
        "height": h,
        "trained": result.trained,
        "classes": list(result.classes),
        "classes_present": list(areas),
        "areas": areas,
        "people": result.people_summary(),
        "timings_s": {k: round(v, 4) for k, v in timings.seconds.items()},
    }


def write_outputs(job: Job, image: np.ndarray, result: ParsingResult, palette: list[tuple[int, int, int]],
                  kinds: Iterable[str], timings: Timings) -> list[Path]:
    job.out_stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in kinds:
        path = job.out_stem.with_name(f"{job.out_stem.name}.{kind}.png")
        if kind == "color":
            path.write_bytes(render.encode_png(render.colorize(result.label_map, palette)))
        elif kind == "label":
            path.write_bytes(render.encode_png(result.label_map))
        elif kind == "overlay":
            path.write_bytes(render.encode_png(render.overlay(image, result.label_map, palette)))
        elif kind == "json":
            path = job.out_stem.with_name(f"{job.out_stem.name}.json")
            path.write_text(json.dumps(summary(result, job.source, timings), indent=2) + "\n")
        written.append(path)
    return written


def output_paths(job: Job, kinds: Iterable[str]) -> list[Path]:
    """The files ``write_outputs`` writes for ``job`` (``--resume`` checks them)."""
    return [job.out_stem.with_name(f"{job.out_stem.name}.json" if kind == "json" else f"{job.out_stem.name}.{kind}.png")
            for kind in kinds]


def write_outputs_atomically(job: Job, image: np.ndarray, result: ParsingResult,
                             palette: list[tuple[int, int, int]], kinds: Iterable[str], timings: Timings) -> list[Path]:
    """``write_outputs`` under a hidden temporary stem, then each file renamed into place.

    A killed process leaves at most ``.<stem>.partial*`` files (overwritten by the next run),
    never a truncated file under a final name, so an existing output is always complete.
    """
    kinds = list(kinds)
    temp = Job(job.source, job.out_stem.with_name(f".{job.out_stem.name}.partial"))
    try:
        written = write_outputs(temp, image, result, palette, kinds, timings)
    except BaseException:
        for path in output_paths(temp, kinds):
            path.unlink(missing_ok=True)
        raise
    final = []
    for path in written:
        target = job.out_stem.with_name(job.out_stem.name + path.name[len(temp.out_stem.name):])
        path.replace(target)
        final.append(target)
    return final


def run(engine: ParsingEngine, jobs: list[Job], kinds: list[str], *, max_pixels: int, max_side: int,
        mode: Mode = "exact", progress: bool = True, err: TextIO = sys.stderr) -> int:
    """Parses every job; returns the number of failed inputs (reported on ``err`` and skipped)."""
    from tqdm import tqdm

    failed = 0
    bar = tqdm(jobs, unit="img", disable=not progress or len(jobs) < 2, file=err, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.source.name[-40:], refresh=False)
        timings = Timings()
        try:
            data = job.source.read_bytes()
            image, result = parse_image(engine, data, max_pixels=max_pixels, max_side=max_side, mode=mode,
                                        timings=timings)
            write_outputs_atomically(job, image, result, engine.card.palette, kinds, timings)
        except (ServiceError, OSError) as exc:
            failed += 1
            message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            tqdm.write(f"skipped {job.source}: {message}", file=err)
    return failed
