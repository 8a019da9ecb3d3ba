"""`captioner caption PATH... --output FILE`: records, resume, changed files, CSV, errors,
shards, output checks, usage errors and the progress bar (in-process through `cli.main`;
the tiny model, float32 decoding so that batching cannot change a caption)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_tree(root: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` small JPEGs in a few folders; returns them in discovery order."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        folder = root / f"d{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"im{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(path, quality=80)
        paths.append(path)
    return sorted(paths)


@pytest.fixture
def tree(tmp_path) -> list[Path]:
    return make_tree(tmp_path / "photos", 10)


def caption(model: Path, *args, out: Path | None = None) -> int:
    argv = ["caption", *map(str, args), "--model", str(model), "--batch-size", "4", "--precision", "float32"]
    return main(argv + (["--output", str(out)] if out else []))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_records_match_plain_mode_and_errors_go_to_stderr_and_file(tiny_model_file, tree, tmp_path, capsys):
    bad = tree[0].parent / "broken.jpg"
    bad.write_text("not a picture")
    assert caption(tiny_model_file, tree[0].parents[1], "--format", "jsonl") == 1
    plain = {r["image"]: r["caption"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    assert caption(tiny_model_file, tree[0].parents[1], "--errors", errors, out=out) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"captioner: error: {bad}: not an image file" in captured.err
    assert "10 captioned, 0 already done, 1 failed" in captured.err
    records = rows(out)
    assert {r["image"]: r["caption"] for r in records} == plain
    for r, path in zip(records, tree):
        assert list(r) == ["image", "caption", "log_prob", "size", "mtime_ns"]
        assert r["image"] == str(path) and r["size"] == path.stat().st_size
        assert r["mtime_ns"] == path.stat().st_mtime_ns and isinstance(r["log_prob"], float)
    assert [json.loads(line) for line in errors.read_text().splitlines()] == [
        {"image": str(bad), "error": "not an image file (cannot identify image format)"}]


def test_a_rerun_skips_and_a_changed_file_is_redone(tiny_model_file, tree, tmp_path, capsys):
    out = tmp_path / "out.csv"
    assert caption(tiny_model_file, tree[0].parents[1], out=out) == 0
    before = out.read_bytes()
    assert caption(tiny_model_file, tree[0].parents[1], out=out) == 0
    assert out.read_bytes() == before
    assert "0 captioned, 10 already done" in capsys.readouterr().err
    changed = tree[4]
    Image.new("RGB", (40, 30), (200, 10, 10)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert caption(tiny_model_file, tree[0].parents[1], out=out) == 0
    err = capsys.readouterr().err
    assert "1 images changed since they were captioned" in err and "1 captioned, 9 already done" in err
    lines = out.read_text().splitlines()
    assert lines[0] == "image,caption,log_prob,size,mtime_ns,alternatives"
    table = list(csv.DictReader(lines))
    assert sorted(r["image"] for r in table) == sorted(map(str, tree))  # once each
    (new,) = [r for r in table if r["image"] == str(changed)]
    assert int(new["size"]) == changed.stat().st_size and int(new["mtime_ns"]) == changed.stat().st_mtime_ns


def test_n_best_records_carry_alternatives(tiny_model_file, tree, tmp_path):
    out = tmp_path / "out.jsonl"
    assert caption(tiny_model_file, *tree[:3], "--beam-size", "3", "--n-best", "2", out=out) == 0
    for r in rows(out):
        assert len(r["alternatives"]) == 2 and r["alternatives"][0]["caption"] == r["caption"]


def test_two_shards_concatenated_equal_the_whole(tiny_model_file, tmp_path):
    make_tree(tmp_path / "photos", 16, seed=1)
    whole = tmp_path / "whole.jsonl"
    assert caption(tiny_model_file, tmp_path / "photos", out=whole) == 0
    parts = [tmp_path / f"shard{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        assert caption(tiny_model_file, tmp_path / "photos", "--shard", f"{i}/2", out=part) == 0
    shard_rows = [rows(p) for p in parts]
    assert all(shard_rows)  # both shards got work
    combined = sorted((r["image"], r["caption"]) for part in shard_rows for r in part)
    assert combined == sorted((r["image"], r["caption"]) for r in rows(whole))


def test_output_targets_are_checked_before_any_work(tiny_model_file, tree, tmp_path, capsys):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "dir.jsonl").mkdir()
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my own notes\n")
    for target in (fifo, tmp_path / "dir.jsonl", notes):
        assert caption(tiny_model_file, *tree[:2], out=target) == 1
        assert str(target) in capsys.readouterr().err
    assert notes.read_text() == "my own notes\n"
    same = tmp_path / "same.jsonl"
    assert caption(tiny_model_file, *tree[:2], "--errors", same, out=same) == 2
    assert "errors file must not be the output" in capsys.readouterr().err


@pytest.mark.parametrize("shard", ["0/0", "3/2", "x/y", "-1/2", "2/2"])
def test_a_bad_shard_is_a_usage_error(tiny_model_file, tree, tmp_path, shard, capsys):
    with pytest.raises(SystemExit) as exit_info:
        caption(tiny_model_file, tree[0], "--shard", shard, out=tmp_path / "o.jsonl")
    assert exit_info.value.code == 2 and "--shard" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["--progress"], "needs --output"),
    (["--shard", "0/2"], "needs --output"),
    (["--output", "out.txt"], "must end in .jsonl"),
    (["--output", "o.jsonl", "--attention-maps", "maps"], "--attention-maps"),
    (["--output", "o.jsonl", "--num-nodes", "2"], "go with --devices"),
])
def test_usage_errors(tiny_model_file, tree, tmp_path, monkeypatch, args, message, capsys):
    monkeypatch.chdir(tmp_path)
    assert caption(tiny_model_file, tree[0], *args) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.glob("o*"))


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_workers_is_bounded(tiny_model_file, tree, value):
    with pytest.raises(SystemExit) as exit_info:
        caption(tiny_model_file, tree[0], "--workers", value)
    assert exit_info.value.code == 2


def test_progress_bar_only_when_asked(tiny_model_file, tree, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert caption(tiny_model_file, *tree[:6], "--workers", "2", out=out) == 0
    assert "img/s" not in capsys.readouterr().err  # stderr is not a terminal here
    assert caption(tiny_model_file, tree[0].parents[1], "--progress", out=out) == 0
    err = capsys.readouterr().err
    assert "img/s" in err and "10/10" in err  # 6 resumed + 4 new, against the counted total


@pytest.mark.slow
def test_bulk_mode_does_not_import_lightning(tiny_model_file, tree, tmp_path):
    out = tmp_path / "out.jsonl"
    code = ("import sys; from captioner.cli import main; "
            f"rc = main(['caption', {str(tree[0])!r}, '--model', {str(tiny_model_file)!r}, '--output', {str(out)!r}]); "
            "assert not any(m.startswith(('pytorch_lightning', 'lightning')) for m in sys.modules), 'lightning'; "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(rows(out)) == 1


def test_devices_from_inside_python_is_refused(tiny_model_file, tree, tmp_path, capsys):
    """Lightning relaunches sys.argv for the other ranks: here that would be pytest's."""
    assert caption(tiny_model_file, tree[0], "--devices", "2", out=tmp_path / "o.jsonl") == 2
    assert "python -m captioner" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
