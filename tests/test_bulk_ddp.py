"""`--devices 2` on CPU (Lightning DDP over gloo; Lightning relaunches the command for rank 1):
the same captions as one process, every image exactly once, leftover part files of a killed
run folded in, failures summed over ranks; through `python -m captioner` and through the
`captioner` console script. Each run starts two processes that import Lightning: `slow`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
COUNT = 24


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "photos"
    rng = np.random.default_rng(3)
    for i in range(COUNT):
        folder = root / f"d{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.jpg")
    return root


def options(model: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--output", str(out), "--batch-size", "4", "--precision", "float32"]


@pytest.fixture(scope="module")
def reference(tiny_model_file, tree, tmp_path_factory, one_torch_thread) -> dict[str, str]:
    from captioner.cli import main
    out = tmp_path_factory.mktemp("one") / "out.jsonl"
    assert main(["caption", str(tree), *options(tiny_model_file, out)]) == 0
    return captions(out)


def captions(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    images = [r["image"] for r in rows]
    assert len(images) == len(set(images)), "an image recorded twice"
    return {r["image"]: r["caption"] for r in rows}


def run(argv: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_cpu_processes_match_one_and_resume(tiny_model_file, tree, reference, tmp_path):
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    bad = tree / "d0" / "zz-broken.jpg"
    bad.write_text("not a picture")
    # What a killed earlier run leaves: a rank's part file with two records and a torn line.
    first = sorted(tree.rglob("im00[01].jpg"))
    part = tmp_path / "out.jsonl.rank1.part"
    part.write_text("".join(json.dumps({"image": str(p), "caption": reference[str(p)], "log_prob": -1.0,
                                        "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}) + "\n"
                            for p in first) + '{"image": "torn')
    try:
        argv = [sys.executable, "-m", "captioner", "caption", str(tree), *options(tiny_model_file, out),
                "--devices", "2", "--accelerator", "cpu", "--errors", str(errors)]
        proc = run(argv)
        assert proc.returncode == 1, proc.stderr[-3000:]  # the broken image, counted over both ranks
        assert f"{COUNT - 2} captioned, 2 already done, 1 failed" in proc.stderr
        assert captions(out) == reference
        assert [json.loads(line)["image"] for line in errors.read_text().splitlines()] == [str(bad)]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["errors.jsonl", "out.jsonl"]  # parts merged
    finally:
        bad.unlink()
    again = run(argv)
    assert again.returncode == 0 and f"0 captioned, {COUNT} already done" in again.stderr


@pytest.mark.slow
def test_console_script_with_a_shard(tiny_model_file, tree, reference, tmp_path):
    script = shutil.which("captioner", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the captioner console script is not installed next to this Python")
    outs = [tmp_path / f"shard{i}.jsonl" for i in range(2)]
    for i, out in enumerate(outs):
        proc = run([script, "caption", str(tree), *options(tiny_model_file, out), "--devices", "2",
                    "--accelerator", "cpu", "--shard", f"{i}/2"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    merged = {**captions(outs[0]), **captions(outs[1])}
    assert len(merged) == COUNT and merged == reference
