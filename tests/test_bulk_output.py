"""The bulk output file and the work split, without a model: resume keys, repairs after a
kill, compaction of stale records, refusing foreign files, CSV quoting, locking, shards and
the counting walk (`captioner/bulk_output.py`, `captioner/bulk.py`)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from captioner.bulk import Selector, Shard, count_images, stable_hash
from captioner.bulk_output import (
    CSV_COLUMNS,
    file_key,
    format_for,
    merge_into,
    open_records,
    part_files,
    rank_file,
    read_done,
)
from captioner.discovery import iter_images
from captioner.errors import OutputError, UsageError


def record(path: Path | str, caption: str = "a dog runs", **extra) -> dict:
    info = os.stat(path)
    return {"image": str(path), "caption": caption, "log_prob": -1.5, **extra,
            "size": info.st_size, "mtime_ns": info.st_mtime_ns}


@pytest.fixture
def images(tmp_path) -> list[Path]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(5):
        p = folder / f"im{i}.jpg"
        p.write_bytes(b"x" * (10 + i))
        paths.append(p)
    return paths


def write_records(out: Path, rows: list[dict]) -> None:
    fmt = format_for(out)
    records = open_records(out, fmt)
    records.append(rows)
    records.close()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_append_then_reopen_gives_the_done_set(tmp_path, images, suffix):
    out = tmp_path / f"out{suffix}"
    write_records(out, [record(p) for p in images[:3]])
    again = open_records(out, format_for(out))
    try:
        assert set(again.done) == {str(p) for p in images[:3]}
        assert again.done[str(images[0])] == file_key(images[0].stat().st_size, images[0].stat().st_mtime_ns)
        assert not again.report.rewritten
    finally:
        again.close()
    lines = out.read_text().splitlines()
    assert len(lines) == (4 if suffix == ".csv" else 3)
    if suffix == ".csv":
        assert lines[0] == ",".join(CSV_COLUMNS)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_partial_last_line_is_cut_off(tmp_path, images, suffix):
    out = tmp_path / f"out{suffix}"
    write_records(out, [record(p) for p in images[:2]])
    whole = out.read_bytes()
    fmt = format_for(out)
    partial = fmt.line(record(images[2])).encode()[:17]
    out.write_bytes(whole + partial)
    records = open_records(out, fmt)
    records.close()
    assert records.report.cut_bytes == len(partial)
    assert out.read_bytes() == whole
    assert set(records.done) == {str(p) for p in images[:2]}


def test_a_kill_during_the_csv_header_leaves_a_file_that_reopens(tmp_path):
    out = tmp_path / "out.csv"
    out.write_bytes(b"image,capt")
    open_records(out, format_for(out)).close()
    assert out.read_text() == ",".join(CSV_COLUMNS) + "\n"


def test_a_changed_file_loses_its_record(tmp_path, images):
    out = tmp_path / "out.jsonl"
    write_records(out, [record(p) for p in images])
    images[1].write_bytes(b"changed, and longer than before")
    gone = images[2]
    gone.unlink()
    records = open_records(out, format_for(out))
    records.close()
    assert records.report.stale == 1 and records.report.rewritten
    assert str(images[1]) not in records.done
    assert str(gone) in records.done  # a vanished file's record is kept
    kept = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert kept == [str(p) for p in images if p != images[1]]


def test_duplicates_and_damaged_lines_are_compacted(tmp_path, images):
    out = tmp_path / "out.jsonl"
    fmt = format_for(out)
    lines = [fmt.line(record(images[0], "first")), fmt.line(record(images[1])), "{not json",
             fmt.line(record(images[0], "second"))]
    out.write_text("\n".join(lines) + "\n")
    records = open_records(out, fmt)
    records.close()
    assert records.report.duplicates == 1 and records.report.bad_lines == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["image"], r["caption"]) for r in rows] == [(str(images[1]), "a dog runs"),
                                                         (str(images[0]), "second")]


@pytest.mark.parametrize("suffix, content", [(".jsonl", "my notes\n"), (".jsonl", '{"a": 1}\n'),
                                             (".csv", "name,value\n1,2\n"), (".jsonl", "no newline at all")])
def test_someone_elses_file_is_refused_untouched(tmp_path, suffix, content):
    out = tmp_path / f"notes{suffix}"
    out.write_text(content)
    with pytest.raises(OutputError, match="never overwritten"):
        open_records(out, format_for(out))
    assert out.read_text() == content


def test_a_second_writer_is_refused(tmp_path, images):
    out = tmp_path / "out.jsonl"
    first = open_records(out, format_for(out))
    try:
        with pytest.raises(OutputError, match="another captioner run"):
            open_records(out, format_for(out))
    finally:
        first.close()
    open_records(out, format_for(out)).close()  # free again once the first closed


def test_csv_quotes_and_escapes_so_each_record_is_one_line(tmp_path):
    folder = tmp_path / 'we,ird "dir"'
    folder.mkdir()
    nasty = folder / "line\nbreak, tab\t.jpg"
    nasty.write_bytes(b"abc")
    out = tmp_path / "out.csv"
    alternatives = [{"caption": 'say "hi", ok', "log_prob": -1.0, "score": -0.5}]
    write_records(out, [record(nasty, 'a "quoted", caption', alternatives=alternatives)])
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    row = next(csv.DictReader(lines))
    assert row["caption"] == 'a "quoted", caption'
    assert json.loads(row["alternatives"]) == alternatives
    assert "\n" not in row["image"] and row["image"].endswith("line\\nbreak, tab\\t.jpg")
    records = open_records(out, format_for(out))
    records.close()
    assert set(records.done) == {str(nasty)}  # unescaped back to the real path


def test_suffix_picks_the_format(tmp_path):
    assert format_for("a.jsonl").name == "jsonl" and format_for("b.CSV").name == "csv"
    with pytest.raises(UsageError, match=".jsonl"):
        format_for("c.txt")


def test_part_files_are_folded_in_and_removed(tmp_path, images):
    out = tmp_path / "out.jsonl"
    fmt = format_for(out)
    for rank, chunk in enumerate((images[:2], images[2:])):
        part = open_records(rank_file(out, rank), fmt, check_stale=False)
        part.append([record(p) for p in chunk])
        part.close()
    (tmp_path / "out.jsonl.rank1.part").open("a").write('{"image": "half')  # a killed rank
    assert part_files(out) == [rank_file(out, 0), rank_file(out, 1)]
    records = open_records(out, fmt)
    records = merge_into(records, part_files(out))
    records.close()
    assert part_files(out) == []
    assert sorted(json.loads(line)["image"] for line in out.read_text().splitlines()) == sorted(map(str, images))
    assert read_done(out, fmt, lambda p: p.endswith("im0.jpg")) == {
        str(images[0]): file_key(images[0].stat().st_size, images[0].stat().st_mtime_ns)}


def test_file_key_separates_size_and_time():
    assert file_key(1, 0) != file_key(0, 1)
    assert file_key(5, -10) != file_key(5, 10) and file_key(5, -10) >= 0


@pytest.mark.parametrize("text", ["0/0", "3/2", "2/2", "x/y", "-1/2", "1", "1/", "/2", "1/2/3", "１/２"])
def test_bad_shards_are_refused(text):
    with pytest.raises(UsageError, match="0 <= I < N"):
        Shard.parse(text)


def test_shards_and_ranks_partition_every_path():
    paths = [f"photos/{i:05d}.jpg" for i in range(2000)]
    owners = [[s for s in range(3) if Selector([(s, 3)])(p)] for p in paths]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(o == [s] for o in owners) for s in range(3)]
    assert min(sizes) > 550  # the hash spreads evenly
    nested = [[(s, r) for s in range(2) for r in range(3) if Selector([(s, 2), (r, 3)])(p)] for p in paths]
    assert all(len(n) == 1 for n in nested)
    assert stable_hash("a.jpg") == stable_hash("a.jpg") != stable_hash("b.jpg")


def test_the_count_agrees_with_discovery(tmp_path):
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ("a/1.jpg", "a/2.PNG", "a/b/3.jpeg", "a/notes.txt", "a/._4.jpg", ".hidden/5.jpg", "6.webp"):
        (root / name).write_bytes(b"x")
    (root / "a" / "b" / "loop").symlink_to(root / "a")
    for paths in ([str(root)], [str(root / "**" / "*.jpg")], [str(root / "a" / "1.jpg")]):
        found = sum(1 for f in iter_images(paths) if f.ok)
        assert count_images(paths) == found, paths
    twice = [str(root), str(root / "a" / "1.jpg")]  # the walk itself: a file named twice counts once
    assert count_images(twice) == sum(1 for f in iter_images(twice) if f.ok)
    select = Selector([(0, 2)])
    assert count_images([str(root)], select=select) == sum(1 for f in iter_images([str(root)]) if f.ok
                                                          and select(f.path))
