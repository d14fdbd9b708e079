"""``m2fp parse --shard I/N --resume``: disjoint shards covering every input, reruns skip done work,
outputs appear atomically (a failed or killed write never leaves a file that looks done)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2fp_service import batch, labelsets
from m2fp_service.cli import main
from m2fp_service.engine import ParsingEngine
from m2fp_service.limits import ImageLimits
from m2fp_service.pipeline import Timings, process

KINDS = "label,json"
GOOD = ["a.jpg", "b.png", "sub/c.jpg", "sub/d.webp", "sub/deeper/e.jpg", "f.bmp", "g.jpg"]


@pytest.fixture
def images(tmp_path: Path, photo: np.ndarray) -> Path:
    root = tmp_path / "in"
    for i, name in enumerate(GOOD):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[:96, i * 64:i * 64 + 160]).save(path)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def _outputs(out: Path) -> dict[str, float]:
    """Final output files (relative path -> mtime); partial files are hidden and must not remain."""
    files = {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert not [f for f in files if ".partial" in f], files
    return files


def _stems(files: dict[str, float]) -> set[str]:
    return {f.removesuffix(".json") for f in files if f.endswith(".json")}


def _parse(images: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["parse", str(images), "-o", str(out), "--model", str(model), "--outputs", KINDS, "-q", *extra])


def test_shards_are_disjoint_cover_everything_and_resume(images: Path, tmp_path: Path, tiny_model_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    expected = {name.rsplit(".", 1)[0] for name in GOOD}
    shares: list[set[str]] = []
    codes = []
    for i in range(3):
        before = _stems(_outputs(out)) if out.exists() else set()
        codes.append(_parse(images, out, tiny_model_path, "--shard", f"{i}/3"))
        shares.append(_stems(_outputs(out)) - before)
        assert f"(shard {i}/3: " in capsys.readouterr().err
    assert set().union(*shares) == expected and sum(map(len, shares)) == len(expected)  # disjoint, covering
    assert sorted(codes).count(1) == 1 and codes.count(0) == 2  # broken.jpg belongs to exactly one shard
    assert all(shares), "7 inputs over 3 shards: every shard got work (fixed by the hash; see test_shard.py)"
    files = _outputs(out)
    assert len(files) == 2 * len(expected)

    # Rerun with --resume: nothing is redone (mtimes unchanged); only broken.jpg is tried again.
    failing = []
    for i in range(3):
        code = _parse(images, out, tiny_model_path, "--shard", f"{i}/3", "--resume")
        err = capsys.readouterr().err
        assert f"({len(shares[i])} already done, skipped)" in err
        assert code == (1 if "; 1 failed" in err else 0)
        failing += [i] if code else []
    assert failing == [codes.index(1)]
    assert _outputs(out) == files

    # One output missing: only that input is parsed again.
    victim = sorted(expected)[3]
    (out / f"{victim}.label.png").unlink()
    assert _parse(images, out, tiny_model_path, "--resume") == 1  # all shards at once; broken.jpg still fails
    after = _outputs(out)
    assert after.keys() == files.keys()
    changed = {f for f in files if after[f] != files[f]}
    assert changed == {f"{victim}.label.png", f"{victim}.json"}


def test_without_resume_everything_is_redone(images: Path, tmp_path: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "out"
    assert _parse(images / "sub" / "deeper", out, tiny_model_path, "--shard", "0/1") == 0
    first = _outputs(out)
    assert set(first) == {"e.json", "e.label.png"}
    assert _parse(images / "sub" / "deeper", out, tiny_model_path) == 0
    second = _outputs(out)
    assert second.keys() == first.keys() and all(second[f] != first[f] for f in first)


def test_an_empty_shard_or_all_done_exits_0(images: Path, tmp_path: Path, tiny_model_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    one = images / "a.jpg"
    out = tmp_path / "out"
    owners = [i for i in range(4) if main(["parse", str(one), "-o", str(out), "--model", str(tiny_model_path),
                                           "--outputs", KINDS, "-q", "--shard", f"{i}/4"]) == 0]
    err = capsys.readouterr().err
    assert owners == [0, 1, 2, 3] and err.count("nothing to parse (shard") == 3
    assert main(["parse", str(one), "-o", str(out), "--model", str(tiny_model_path), "--outputs", KINDS, "-q",
                 "--resume"]) == 0
    assert "nothing to parse (1 already done, skipped)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "message"),
    [("3/3", "shard index must be in 0..2"), ("1/0", "shard count must be at least 1"),
     ("two/4", "expected I/N"), ("-1/2", "shard index must be in 0..1")],
)
def test_bad_shard_values(value: str, message: str, images: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["parse", str(images), "-o", str(tmp_path / "o"), f"--shard={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--shard" in err and message in err
    assert not (tmp_path / "o").exists()


def test_partial_files_never_count_as_done(images: Path, tmp_path: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # What a killed run leaves: hidden partial files, complete or truncated; never final names.
    (out / ".a.partial.json").write_text('{"trunc')
    (out / ".a.partial.label.png").write_bytes(b"\x89PNG")
    assert _parse(images / "a.jpg", out, tiny_model_path, "--resume") == 0
    assert set(_outputs(out)) == {"a.json", "a.label.png"}  # parsed, and the partials renamed away


def test_a_failed_write_leaves_nothing_behind(images: Path, tmp_path: Path, engine: ParsingEngine,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    (job,) = batch.collect_jobs([images / "a.jpg"], out)
    request = batch.render_request(["color", "label", "overlay", "json"], labelsets.label_set("cihp"), None)
    rendered = process(engine, (images / "a.jpg").read_bytes(), request,
                       limits=ImageLimits(max_pixels=10**8, max_side=10**4))
    written = batch.write_outputs(job, rendered, request, Timings())
    assert written == list(batch.output_paths(job, request).values())  # --resume checks exactly what is written
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    for p in written:
        p.unlink()

    calls = 0
    real = batch._write_bytes

    def failing(path: Path, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, os.strerror(28))  # disk full on the second file
        real(path, data)

    monkeypatch.setattr(batch, "_write_bytes", failing)
    with pytest.raises(OSError, match="No space"):
        batch.write_outputs(job, rendered, request, Timings())
    assert list(out.iterdir()) == []
