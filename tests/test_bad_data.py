"""Bad datasets and configs through `captioner features | evaluate | train`.

The readers' own checks are unit-tested in test_sources.py; here we check what a user sees
from the commands: one `captioner: error: ...` line naming the file (and line), a counted
`captioner: warning: ...` for what --skip-missing drops, the documented exit status, and
never a traceback, including from DataLoader worker processes and from LightningCLI.

Error paths that stop before any image is encoded run in-process through `cli.main` (fast;
a return value instead of an exception proves there was no traceback); the ones that matter
most also run as real processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ERROR = "captioner: error: "
WARNING = "captioner: warning: "
CLI_ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}


def run_cli(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, errors="replace", timeout=timeout, env=CLI_ENV)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR)]


def photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


def folder_dataset(root: Path, images: int = 4, missing: int = 0, corrupt: int = 0,
                   extra_lines: list[str] | None = None) -> Path:
    """root/ with img*.png and captions.jsonl (train, and the last image dev)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images + missing + corrupt):
        name = f"img{i:02d}.png"
        if i < images:
            photo(root / name, i)
        elif i < images + missing:
            name = f"gone{i:02d}.png"  # listed, never written
        else:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a broken PNG
        split = "dev" if i == images - 1 else "train"
        lines.append(json.dumps({"image": name, "captions": [f"a dog number {i}", "a red ball"],
                                 "split": split}))
    lines += extra_lines or []
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def main_rc(args: list[str], capsys) -> tuple[int, str, str]:
    from captioner.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------ features


def test_features_missing_images_is_one_clear_error(tmp_path, capsys):
    root = folder_dataset(tmp_path / "data", images=2, missing=2)
    rc, out, err = main_rc(["features", "--dataset", "folder", "--data-root", root,
                            "--out", tmp_path / "cache"], capsys)
    assert rc == 1 and out == ""
    assert err.splitlines() == [
        f"{ERROR}{root / 'captions.jsonl'}: 2 of 4 captioned images missing on disk: "
        f"{root / 'gone02.png'}, {root / 'gone03.png'} (--skip-missing or skip_missing=True drops them)"]
    assert not (tmp_path / "cache").exists()  # nothing started


@pytest.mark.slow
def test_features_skip_missing_warns_with_a_count_and_bad_image_is_reported(tmp_path):
    """A real process with DataLoader worker processes: the missing image is a counted
    warning, the corrupt one a single error line (exit 1) with the good rows kept (that a
    re-run then encodes only the fixed image is test_features.py's)."""
    root = folder_dataset(tmp_path / "data", images=3, missing=1, corrupt=1)
    cache = tmp_path / "cache"
    args = ["features", "--dataset", "folder", "--data-root", root, "--out", cache, "--skip-missing",
            "--workers", "2", "--batch-size", "2"]
    first = run_cli(*args)
    no_traceback(first)
    assert first.returncode == 1
    warnings = [line for line in first.stderr.splitlines() if line.startswith(WARNING)]
    assert warnings == [f"{WARNING}{root / 'captions.jsonl'}: 1 of 5 captioned images missing on disk: "
                        f"{root / 'gone03.png'}; skipped"]
    errors = error_lines(first.stderr)
    assert len(errors) == 1, first.stderr
    assert errors[0].startswith(f"{ERROR}1 of 4 images could not be read: {root / 'img04.png'}: ")
    assert "the 3 finished rows are kept" in errors[0]
    index = json.loads((cache / "index.json").read_text())
    assert index["done"] == 4 and not index["complete"] and [f["row"] for f in index["failed"]] == [3]


@pytest.mark.parametrize("problem", ["empty caption", "not UTF-8", "same image in two splits",
                                     "invalid JSON", "unknown split", "no captions file"])
def test_features_malformed_folder_dataset(tmp_path, capsys, problem):
    root = folder_dataset(tmp_path / "data", images=2)
    captions = root / "captions.jsonl"
    bad_line = {
        "empty caption": '{"image": "img00.png", "caption": "   "}',
        "not UTF-8": None,
        "same image in two splits": '{"image": "img00.png", "caption": "a cat", "split": "test"}',
        "invalid JSON": '{"image": "img00.png", caption: "a cat"}',
        "unknown split": '{"image": "img00.png", "caption": "a cat", "split": "holdout"}',
        "no captions file": None,
    }[problem]
    if problem == "not UTF-8":
        captions.write_bytes(captions.read_bytes() + '{"image": "img00.png", "caption": "caf\u00e9"}\n'
                             .encode("latin-1"))
    elif problem == "no captions file":
        captions.unlink()
    else:
        captions.write_text(captions.read_text() + bad_line + "\n")
    rc, out, err = main_rc(["features", "--dataset", "folder", "--data-root", root,
                            "--out", tmp_path / "cache"], capsys)
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith(ERROR), err
    where = f"{captions}:3: " if problem != "no captions file" else f"{root}: "
    assert err.startswith(f"{ERROR}{where}"), err
    expected = {"empty caption": "empty caption", "not UTF-8": "not valid UTF-8 (byte 0xe9)",
                "same image in two splits": "split", "invalid JSON": "invalid JSON",
                "unknown split": "unknown split 'holdout'", "no captions file": "no captions.jsonl"}[problem]
    assert expected in err


def test_duplicate_image_ids(tmp_path, capsys):
    """Karpathy JSON listing an image twice, and a Flickr8k split list naming one twice, are
    errors naming the place; a folder's repeated one-caption rows for one image merge
    (documented in captioner/data/folder.py)."""
    root = tmp_path / "karpathy"
    (root / "images").mkdir(parents=True)
    photo(root / "images" / "a.jpg", 0)
    entry = {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a dog"}]}
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": [entry, entry]}))
    rc, out, err = main_rc(["features", "--dataset", "karpathy", "--data-root", root,
                            "--out", tmp_path / "c1"], capsys)
    assert rc == 1 and err.splitlines() == [
        f"{ERROR}{root / 'dataset_flickr8k.json'}: images[1] (a.jpg): image listed twice (also images[0])"]

    flickr = tmp_path / "flickr8k"
    (flickr / "images").mkdir(parents=True)
    photo(flickr / "images" / "a.jpg", 0)
    (flickr / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog\n")
    (flickr / "Flickr_8k.trainImages.txt").write_text("a.jpg\na.jpg\n")
    (flickr / "Flickr_8k.devImages.txt").write_text("")
    (flickr / "Flickr_8k.testImages.txt").write_text("")
    rc, out, err = main_rc(["features", "--dataset", "flickr8k", "--data-root", flickr,
                            "--out", tmp_path / "c2"], capsys)
    assert rc == 1 and err.splitlines() == [
        f"{ERROR}{flickr / 'Flickr_8k.trainImages.txt'}:2: duplicate image a.jpg (first on line 1)"]

    from captioner.data.sources import read_dataset
    folder = folder_dataset(tmp_path / "folder", images=2,
                            extra_lines=['{"image": "img00.png", "caption": "one more caption", "split": "train"}'])
    records = {r.image_id: r for r in read_dataset("folder", folder)}
    assert len(records) == 2 and records["img00.png"].captions[-1] == "one more caption"


@pytest.mark.parametrize("args, message", [
    (["--dataset", "nope"], "argument --dataset: unknown dataset 'nope'"),
    (["--dataset", "folder", "--splits", "train,holdout"], "argument --splits: unknown split 'holdout'"),
    (["--dataset", "folder", "--batch-size", "0"], "argument --batch-size: must be an integer from 1"),
])
def test_features_usage_errors(tmp_path, args, message):
    proc = run_cli("features", "--data-root", tmp_path, "--out", tmp_path / "c", *args, timeout=60)
    no_traceback(proc)
    assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1]


def test_features_wrong_data_path(tmp_path, capsys):
    rc, out, err = main_rc(["features", "--dataset", "flickr8k", "--data-root", tmp_path / "nowhere",
                            "--out", tmp_path / "c"], capsys)
    assert rc == 1 and out == ""
    assert err.splitlines() == [f"{ERROR}{tmp_path / 'nowhere'}: no such directory (expected the Flickr8k root)"]
    assert not (tmp_path / "c").exists()  # nothing started


# ------------------------------------------------------------------------------ evaluate


def test_evaluate_wrong_data_path(tmp_path, tiny_model_file, capsys):
    rc, out, err = main_rc(["evaluate", "--model", tiny_model_file, "--dataset", "folder",
                            "--data-root", tmp_path / "nowhere", "--split", "test"], capsys)
    assert rc == 1 and out == ""
    assert err.splitlines() == [f"{ERROR}{tmp_path / 'nowhere'}: no such directory (expected the image folder root)"]


def test_evaluate_problems_are_one_line_each(tmp_path, tiny_model_file, capsys):
    root = folder_dataset(tmp_path / "data", images=3, corrupt=1)  # img03.png (train) is broken
    base = ["evaluate", "--model", tiny_model_file, "--dataset", "folder", "--data-root", root,
            "--max-length", "4", "--beam-size", "1"]
    cases = [
        (["--split", "test"], "no records in split(s) test"),
        (["--split", "train", "--model", tmp_path / "missing.safetensors"], "no such model file"),
        (["--split", "train"], "img03.png: corrupt PNG file"),
        (["--split", "dev", "--features", tmp_path / "no-cache"], "not a feature cache"),
    ]
    for extra, message in cases:
        rc, out, err = main_rc([*base, *extra], capsys)
        assert rc == 1 and out == "", (extra, out)
        assert len(err.splitlines()) == 1 and err.startswith(ERROR) and message in err, (extra, err)
    # and the good split still evaluates, writing its outputs
    rc, out, err = main_rc([*base, "--split", "dev", "--output", tmp_path / "m.json"], capsys)
    assert rc == 0 and out.startswith("BLEU1 ")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_images"] == 1 and metrics["split"] == "dev"
    rc, _, _ = main_rc([*base, "--split", "dev", "--precision", "float32", "--output", tmp_path / "f.json"], capsys)
    assert rc == 0 and json.loads((tmp_path / "f.json").read_text())["decoding"]["precision"] == "float32"


# ------------------------------------------------------------------------------ train


TRAIN_YAML = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  default_root_dir: {root}
model:
  decoder:
    cell: lstm
    embed_dim: 8
    hidden_dim: 8
data:
  dataset: folder
  data_root: {data}
  feature_cache: {root}/cache
  min_word_freq: 1
  batch_size: 4
  num_workers: 0
"""


# In-process (importing Lightning once instead of once per process): an exception escaping
# main() is the traceback a user would see; SystemExit(2) is LightningCLI's usage error.

def test_train_unknown_config_key_is_a_usage_error(tmp_path, capsys):
    from captioner.cli import main

    config = tmp_path / "typo.yaml"
    config.write_text(TRAIN_YAML.format(root=tmp_path, data=tmp_path / "data")
                      .replace("hidden_dim:", "hiden_dim:"))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(config)])
    assert exit_.value.code == 2
    assert "hiden_dim" in capsys.readouterr().err.splitlines()[-1]


def test_train_missing_config_file_is_a_usage_error(tmp_path, capsys):
    from captioner.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(tmp_path / "nope.yaml")])
    assert exit_.value.code == 2
    assert "does not exist" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("problem", ["no such directory", "empty caption", "corrupt image", "cache of other images"])
def test_train_dataset_problem_is_one_error_line(tmp_path, capsys, problem):
    from captioner.cli import main

    data = tmp_path / "nowhere"
    expected = f"{ERROR}{data}: no such directory (expected the image folder root)"
    if problem == "empty caption":
        data = folder_dataset(tmp_path / "data", images=2, extra_lines=['{"image": "img00.png", "caption": ""}'])
        expected = f"{ERROR}{data / 'captions.jsonl'}:3: empty caption"
    elif problem == "corrupt image":
        data = folder_dataset(tmp_path / "data", images=2, corrupt=1)
        expected = f"{ERROR}1 of 3 images could not be read: {data / 'img02.png'}: "
    elif problem == "cache of other images":  # a complete cache of 2 images; the data has 3
        small = folder_dataset(tmp_path / "small", images=2)
        assert main(["features", "--dataset", "folder", "--data-root", str(small), "--out",
                     str(tmp_path / "cache"), "--workers", "0"]) == 0
        data = folder_dataset(tmp_path / "data", images=3)
        expected = f"{ERROR}{tmp_path / 'cache'}: this feature cache (2 images) lacks 1 of the 3 images needed"
    config = tmp_path / "train.yaml"
    config.write_text(TRAIN_YAML.format(root=tmp_path, data=data))
    assert main(["train", "--config", str(config)]) == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(expected), errors
