"""`captioner caption DIR --output FILE` killed with SIGKILL at random points and run again
until it finishes: the output equals an uninterrupted run's as a set of records (same image,
same caption), every line parses and no image appears twice. One seed runs in the default
suite; more seeds, a CSV output, and files touched between runs (so a restart compacts the
output, and may be killed while doing so) are `slow`.

Every process runs with one thread and float32 decoding, so batching (which a resumed run
changes) cannot move a caption.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def make_tree(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"d{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(folder / f"im{i:04d}.jpg")


def command(model: Path, tree: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "captioner", "caption", str(tree), "--model", str(model), "--output", str(out),
            "--batch-size", "3", "--precision", "float32", "--no-progress"]


def records(out: Path) -> list[tuple[str, str, int]]:
    """(image, caption, mtime_ns) of every complete line; each must parse."""
    if not out.exists():
        return []
    text = out.read_text()
    lines = text.splitlines()[: text.count("\n")]
    if out.suffix == ".csv":
        import csv
        return [(r["image"], r["caption"], int(r["mtime_ns"])) for r in csv.DictReader(lines)]
    parsed = [json.loads(line) for line in lines]
    return [(r["image"], r["caption"], r["mtime_ns"]) for r in parsed]


def run_until_done(cmd: list[str], out: Path, rng: random.Random, kills: int, tree: Path | None = None) -> int:
    """Start, SIGKILL after a random number of new records (or at a random moment), repeat
    `kills` times, then let it finish. With `tree`, touch a random image between runs."""
    done_kills = 0
    while True:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done_kills < kills:
            if rng.random() < 0.25:  # anywhere: start-up, compaction, captioning
                deadline = time.monotonic() + rng.uniform(0.5, 8.0)
                target = 10**9
            else:
                deadline = time.monotonic() + 300
                target = len(records(out)) + rng.randint(1, 20)
            while proc.poll() is None and time.monotonic() < deadline and len(records(out)) < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.15))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=60)
                done_kills += 1
                images = [r[0] for r in records(out)]  # complete lines parse
                assert len(images) == len(set(images)), "an image recorded twice"
                if tree is not None and rng.random() < 0.5:
                    victim = rng.choice(sorted(tree.rglob("*.jpg")))
                    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
                continue
        _, stderr = proc.communicate(timeout=900)
        assert "Traceback" not in stderr, stderr[-3000:]
        assert proc.returncode == 0, stderr[-3000:]
        return done_kills


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill") / "photos"
    make_tree(root, 60)
    return root


@pytest.fixture(scope="module")
def reference(tiny_model_file, tree, tmp_path_factory, one_torch_thread) -> dict[str, str]:
    """An uninterrupted run (in this process, one thread, as the subprocesses run)."""
    from captioner.cli import main
    out = tmp_path_factory.mktemp("reference") / "out.jsonl"
    assert main(command(tiny_model_file, tree, out)[3:]) == 0
    found = {image: caption for image, caption, _ in records(out)}
    assert len(found) == 60
    return found


def check(out: Path, reference: dict[str, str], tree: Path) -> None:
    assert out.read_text().endswith("\n")
    got = records(out)
    images = [image for image, _, _ in got]
    assert len(images) == len(set(images)), "an image recorded twice"
    assert {image: caption for image, caption, _ in got} == reference
    for image, _, mtime in got:  # no stale record survived a touched file
        assert mtime == os.stat(image).st_mtime_ns


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tiny_model_file, tree, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    rng = random.Random(0)
    assert run_until_done(command(tiny_model_file, tree, out), out, rng, kills=2) >= 1
    check(out, reference, tree)


@pytest.mark.slow
@pytest.mark.parametrize("seed, suffix", [(1, ".jsonl"), (2, ".jsonl"), (3, ".csv"), (4, ".jsonl")])
def test_many_kills_and_touched_files(tiny_model_file, tree, reference, tmp_path, seed, suffix):
    out = tmp_path / f"out{suffix}"
    rng = random.Random(seed)
    run_until_done(command(tiny_model_file, tree, out), out, rng, kills=5, tree=tree)
    check(out, reference, tree)
