"""shard.py: parsing I/N, disjoint covering shares, stability, and the done-check."""

from __future__ import annotations

from pathlib import Path

import pytest

from m2fp_service.shard import Shard, parse_shard, select, shard_of, split_done


@pytest.mark.parametrize(
    ("text", "expected", "error"),
    [
        ("0/1", Shard(0, 1), None),
        ("3/8", Shard(3, 8), None),
        (" 7 / 8 ", Shard(7, 8), None),
        ("8/8", None, "shard index must be in 0..7"),
        ("-1/4", None, "shard index must be in 0..3"),
        ("0/0", None, "shard count must be at least 1"),
        ("1/-2", None, "shard count must be at least 1"),
        ("1", None, "expected I/N"),
        ("a/b", None, "expected I/N"),
        ("1/2/3", None, "expected I/N"),
        ("1.0/2", None, "expected I/N"),
        ("", None, "expected I/N"),
    ],
)
def test_parse_shard(text: str, expected: Shard | None, error: str | None) -> None:
    if error is None:
        assert parse_shard(text) == expected
        assert str(parse_shard(text)) == f"{expected.index}/{expected.count}"  # type: ignore[union-attr]
    else:
        with pytest.raises(ValueError, match=error):
            parse_shard(text)


def _keys(n: int) -> list[str]:
    return [f"folder{i % 7}/img_{i:05d}" for i in range(n)]


@pytest.mark.parametrize("count", [1, 2, 3, 8, 16])
def test_shards_are_disjoint_and_cover_everything(count: int) -> None:
    keys = _keys(1000)
    shares = [select(keys, Shard(i, count), key=str) for i in range(count)]
    union = [k for share in shares for k in share]
    assert sorted(union) == sorted(keys)  # covers, and no key twice
    assert len(set(union)) == len(keys)
    for share in shares:
        assert share == sorted(share)
    if count > 1:  # balanced statistically: 1000/count ± a few sigma
        mean = len(keys) / count
        assert all(abs(len(s) - mean) < 5 * (mean**0.5) + 2 for s in shares), [len(s) for s in shares]


def test_shares_are_deterministic_and_independent_of_order_and_other_files() -> None:
    keys = _keys(300)
    share = select(keys, Shard(2, 5), key=str)
    assert select(list(reversed(keys)), Shard(2, 5), key=str) == share
    # Files appearing later (a pod that lists the folder an hour after another) move nothing.
    grown = keys + [f"late/img_{i}" for i in range(50)]
    assert set(share) <= set(select(grown, Shard(2, 5), key=str))
    # Golden values pin the assignment: a change would reshuffle the shares of a running Job.
    assert [shard_of(k, 16) for k in ("photos/img_00001", "a/b.jpg", "x")] == [0, 8, 4]


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="share the key 'a'"):
        select(["a", "b", "a"], Shard(0, 2), key=str)


def test_split_done_needs_every_output(tmp_path: Path) -> None:
    for name in ("a.json", "a.color.png", "b.json"):
        (tmp_path / name).write_text("x")

    def outputs(stem: str) -> list[Path]:
        return [tmp_path / f"{stem}.json", tmp_path / f"{stem}.color.png"]

    todo, done = split_done(["a", "b", "c"], outputs)
    assert done == ["a"] and todo == ["b", "c"]  # b has only one of its two outputs
    assert split_done(["a"], lambda _: []) == (["a"], [])  # no outputs: never "done"
