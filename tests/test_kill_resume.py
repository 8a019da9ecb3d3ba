"""Nothing half-written: SIGKILL at random points, then resume.

* `captioner features` killed mid-extraction and run again gives cache files byte-identical
  to an uninterrupted run (several seeds, `slow`).
* `captioner train` killed mid-training and resumed with `--ckpt_path last.ckpt` finishes,
  and its exported model file loads and captions (`slow`).
* The same seed gives the same training losses and the same model (`slow`).
* Model files, metrics JSON and predictions are written to a temporary file and renamed.

The dataset is generated (a `folder` dataset, 16 small images), so nothing here needs
Flickr8k. Every process runs with one thread: the features of a resumed run can only be
byte-identical to the reference when both use the same thread settings.
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
N_IMAGES, N_TRAIN = 16, 12
BATCH = 2  # many small batches: many points at which a kill can land
CACHE_FILES = ("grid.f16", "pooled.f16", "index.json")
WORDS = "a the dog cat man girl runs jumps sits on in grass water snow red blue ball bike".split()


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "captioner", *map(str, args)]


def run(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """16 images with 2 captions each: 12 train, 4 dev."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    words = random.Random(0)
    lines = []
    for i in range(N_IMAGES):
        base = rng.integers(0, 255, 3)
        pixels = np.clip(base + rng.normal(0, 40, (40, 56, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:02d}.jpg", quality=90)
        captions = [" ".join(words.choice(WORDS) for _ in range(words.randint(3, 7))) for _ in range(2)]
        lines.append(json.dumps({"image": f"img{i:02d}.jpg", "captions": captions,
                                 "split": "train" if i < N_TRAIN else "dev"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def features_args(dataset: Path, out: Path) -> list:
    return ["features", "--dataset", "folder", "--data-root", dataset, "--out", out,
            "--batch-size", BATCH, "--workers", 0]


@pytest.fixture(scope="module")
def reference_cache(dataset, tmp_path_factory) -> Path:
    """An uninterrupted `captioner features` run: the bytes every resumed run must match."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    proc = run(*features_args(dataset, out))
    assert f"features: {N_IMAGES} images encoded" in proc.stdout
    return out


def read_done(index: Path) -> int:
    try:
        return json.loads(index.read_text())["done"]
    except (OSError, ValueError, KeyError):  # not there yet (or being replaced: never half)
        return -1


def kill_when(proc: subprocess.Popen, ready, rng: random.Random, timeout: float = 300,
              max_delay: float = 0.2) -> bool:
    """SIGKILL `proc` a random 0-`max_delay` s after `ready()` first holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the process never reached the kill point")
        time.sleep(0.005)
    time.sleep(rng.uniform(0, max_delay))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def kill_features_midway(dataset: Path, out: Path, rng: random.Random, attempts: int = 5) -> int:
    """Start `captioner features`, SIGKILL it after some rows are committed; rows done at the kill.

    On a fast machine the last rows can land between the kill decision and the signal, so a
    run that got to the end is thrown away and tried again with an earlier kill point.
    """
    for _ in range(attempts):
        target = rng.randrange(1, N_IMAGES // BATCH // 2 + 1) * BATCH  # first half of the rows
        proc = subprocess.Popen(cli(*features_args(dataset, out)), cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed = kill_when(proc, lambda: read_done(out / "index.json") >= target, rng, max_delay=0.05)
        done = read_done(out / "index.json")
        if killed and 0 <= done < N_IMAGES:
            return done
        shutil.rmtree(out, ignore_errors=True)
    pytest.fail(f"extraction finished before the kill point {attempts} times: use more images")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_killed_and_rerun_is_byte_identical(dataset, reference_cache, tmp_path, seed):
    out = tmp_path / "cache"
    done = kill_features_midway(dataset, out, random.Random(seed))
    index = json.loads((out / "index.json").read_text())  # whole JSON, never half
    assert index["done"] == done and not index["complete"]

    proc = run(*features_args(dataset, out))
    assert f"features: {N_IMAGES - done} images encoded" in proc.stdout  # resumed, not redone
    for name in CACHE_FILES:
        assert (out / name).read_bytes() == (reference_cache / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(CACHE_FILES)  # no temp files left


# ------------------------------------------------------------------------------ training


def train_config(tmp: Path, dataset: Path, cache: Path, max_epochs: int) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": max_epochs, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp / "run"),
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp / "run"), "name": "csv"}},
            "callbacks": [
                # First (trainer.checkpoint_callback, what ExportModelFile exports): the best by
                # dev BLEU-4. In Lightning 2.6 its save_last would refresh last.ckpt only in epochs
                # that improve BLEU, so a second, monitor-less one writes last.ckpt every epoch.
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / "ckpt"), "monitor": "val/bleu4", "mode": "max",
                               "filename": "best"}},
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True, "filename": "latest"}},
                {"class_path": "captioner.train.ExportModelFile",
                 "init_args": {"output": str(tmp / "model.safetensors")}},
            ],
        },
        "model": {"decoder": {"cell": "lstm", "attention": True, "embed_dim": 16, "hidden_dim": 16,
                              "attention_dim": 16, "dropout": 0.2},
                  "optimization": {"lr": 3e-3}, "max_decode_length": 8},
        "data": {"dataset": "folder", "data_root": str(dataset), "feature_cache": str(cache),
                 "min_word_freq": 1, "batch_size": 4, "val_batch_size": 4, "num_workers": 0,
                 "captions_per_epoch": "one"},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def losses(run_dir: Path, version: int = 0) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as fh:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(fh) if r.get("train/loss")]


def checkpoint_epoch(path: Path) -> int:
    """Epoch recorded in a checkpoint, read with the weights-only loader; -1 if absent."""
    import torch

    if not path.is_file():
        return -1
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def settled_epoch(path: Path) -> int:
    """checkpoint_epoch while training may be replacing the file: -1 rather than an error."""
    try:
        return checkpoint_epoch(path)
    except Exception:  # noqa: BLE001 - only the polling tolerates this; the checks below do not
        return -1


def assert_model_file_captions(path: Path, image: Path) -> list[str]:
    from captioner.api import Captioner

    captioner = Captioner.load(path, device="cpu")
    results = captioner.caption([image], beam_size=2, max_length=8)
    assert results[0].ok and isinstance(results[0].caption, str)
    return [r.caption for r in results]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_killed_and_resumed_exports_a_valid_model(dataset, reference_cache, tmp_path, seed):
    rng = random.Random(seed)
    max_epochs = 5
    config = train_config(tmp_path, dataset, reference_cache, max_epochs)
    last = tmp_path / "ckpt" / "last.ckpt"
    kill_after = rng.randint(0, 2)  # epochs whose last.ckpt exists before the kill
    log = tmp_path / "first-run.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cli("train", "--config", config), cwd=REPO, env=ENV, stdout=fh, stderr=fh)
        killed = kill_when(proc, lambda: settled_epoch(last) >= kill_after, rng)
    assert killed, f"training ended before the kill point\n{log.read_text()[-2000:]}"
    assert not (tmp_path / "model.safetensors").exists()  # killed before the end: no model file
    # Whatever instant the kill hit, every checkpoint on disk is whole.
    for ckpt in (tmp_path / "ckpt").glob("*.ckpt"):
        assert checkpoint_epoch(ckpt) >= 0
    resumed_from = checkpoint_epoch(last)
    assert 0 <= resumed_from < max_epochs - 1

    proc = run("train", "--config", config, "--ckpt_path", last, timeout=600)
    assert "captioner: exported" in proc.stdout
    assert checkpoint_epoch(last) == max_epochs - 1
    # The resumed run logged only the remaining epochs' steps, continuing the step count.
    steps = [step for step, _ in losses(tmp_path / "run", version=1)]
    assert steps and steps[0] > 0
    from captioner.modelfile import load_model

    model = load_model(tmp_path / "model.safetensors")
    assert model.decoder_config.attention and model.decoder_config.hidden_dim == 16
    assert_model_file_captions(tmp_path / "model.safetensors", dataset / "img00.jpg")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


@pytest.mark.slow
def test_same_seed_same_losses_and_same_captions(dataset, reference_cache, tmp_path):
    from safetensors.torch import load_file

    runs = []
    for name in ("a", "b"):
        tmp = tmp_path / name
        tmp.mkdir()
        run("train", "--config", train_config(tmp, dataset, reference_cache, max_epochs=2))
        runs.append(tmp)
    a, b = (losses(tmp / "run") for tmp in runs)
    assert len(a) >= 6 and a == b  # step for step, bit for bit
    ta, tb = (load_file(str(tmp / "model.safetensors")) for tmp in runs)
    assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
    image = dataset / "img13.jpg"
    assert (assert_model_file_captions(runs[0] / "model.safetensors", image)
            == assert_model_file_captions(runs[1] / "model.safetensors", image))


# ------------------------------------------------------------------------------ atomic writes


def test_evaluate_writes_metrics_and_predictions_by_rename(dataset, tiny_model_file, tmp_path, monkeypatch):
    """Old outputs survive a failed write, and new ones appear only by os.replace of a
    temporary file in the same directory."""
    import captioner.outputs as outputs
    from captioner.api import Captioner
    from captioner.errors import OutputError
    from captioner.evaluation import evaluate_model

    metrics, predictions = tmp_path / "metrics.json", tmp_path / "preds.jsonl"
    metrics.write_text("old metrics\n")
    predictions.write_text("old predictions\n")
    captioner = Captioner.load(tiny_model_file, device="cpu")
    kwargs = dict(dataset="folder", data_root=str(dataset), split="dev", output=str(metrics),
                  predictions=str(predictions), decoding=captioner.decoding.replace(beam_size=1, max_length=4))

    replaced = []
    real_replace = os.replace

    def crash_on_replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", crash_on_replace)
    with pytest.raises(OutputError, match="No space left on device"):
        evaluate_model(captioner, **kwargs)
    assert metrics.read_text() == "old metrics\n" and predictions.read_text() == "old predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "preds.jsonl"]  # temps removed
    assert [dst for _, dst in replaced] == [predictions, metrics]  # a failure of one never skips the other
    for src, dst in replaced:
        assert src.parent == tmp_path and src.name.startswith(f".{dst.name}.")

    monkeypatch.setattr(outputs.os, "replace", real_replace)
    result = evaluate_model(captioner, **kwargs)
    assert json.loads(metrics.read_text())["n_images"] == result["n_images"] == N_IMAGES - N_TRAIN
    assert len(predictions.read_text().splitlines()) == N_IMAGES - N_TRAIN
    captions = [json.loads(line)["caption"] for line in predictions.read_text().splitlines()]
    saved = json.loads(metrics.read_text())
    assert saved["distinct_captions"] == len(set(captions))  # diversity is reported beside BLEU
    assert saved["distinct_words"] == len({w for c in captions for w in c.split()})


@pytest.mark.slow
def test_shipped_checkpoint_settings_refresh_last_ckpt_every_epoch(dataset, reference_cache, tmp_path):
    shipped = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    checkpoints = [c for c in shipped["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    config = train_config(tmp_path, dataset, reference_cache, max_epochs=3)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"] = [  # the shipped checkpoint callbacks, writing into tmp_path
        {"class_path": c["class_path"], "init_args": {**c["init_args"], "dirpath": str(tmp_path / "ckpt")}}
        for c in checkpoints]
    config.write_text(yaml.safe_dump(settings))
    run("train", "--config", config)
    assert checkpoint_epoch(tmp_path / "ckpt" / "last.ckpt") == 2


@pytest.mark.slow
def test_resumed_run_exports_the_best_checkpoint_of_the_whole_run(dataset, reference_cache, tmp_path):
    """The shipped configs give their checkpoints no dirpath (they live in the logger's
    version_N/checkpoints). A resumed run logs into version_N+1, its checkpoints move there and
    Lightning forgets the best score so far; the export still compares against it."""
    shipped = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    config = train_config(tmp_path, dataset, reference_cache, max_epochs=2)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"] = [  # the shipped checkpoint callbacks as they are, + export
        c for c in shipped["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")
    ] + [c for c in settings["trainer"]["callbacks"] if c["class_path"].endswith("ExportModelFile")]
    config.write_text(yaml.safe_dump(settings))
    run("train", "--config", config)
    first = tmp_path / "run" / "csv" / "version_0"
    from captioner.modelfile import load_model

    # Resumed with nothing left to train: Lightning alone would know no best score at all.
    run("train", "--config", config, "--ckpt_path", first / "checkpoints" / "last.ckpt")
    exported = load_model(tmp_path / "model.safetensors")
    assert Path(exported.training["checkpoint"]).parent == first / "checkpoints"
    assert "dev_bleu4_best" in exported.scores

    run("train", "--config", config, "--trainer.max_epochs", 4, "--ckpt_path", first / "checkpoints" / "last.ckpt")
    scores = []
    for version in (0, 2):  # version_1: the resume with nothing left to train
        with open(tmp_path / "run" / "csv" / f"version_{version}" / "metrics.csv") as fh:
            scores += [float(r["val/bleu4"]) for r in csv.DictReader(fh) if r.get("val/bleu4")]
    assert len(scores) == 4  # two epochs, then two more; the first run's log is left as it was
    exported = load_model(tmp_path / "model.safetensors")
    assert exported.scores["dev_bleu4_best"] == pytest.approx(max(scores))
    assert Path(exported.training["checkpoint"]).is_file()


@pytest.mark.parametrize("mode,earlier,later,expected", [
    ("max", 0.192, 0.176, "earlier"), ("max", 0.150, 0.176, "later"), ("min", 2.0, 2.5, "earlier"),
    ("max", 0.192, None, "earlier")])
def test_export_compares_the_best_before_a_resume_with_the_best_after(tmp_path, mode, earlier, later, expected):
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from captioner.train import ExportModelFile

    before, after = tmp_path / "v0-best.ckpt", tmp_path / "v1-best.ckpt"
    before.write_bytes(b"x")
    after.write_bytes(b"x")
    ckpt = ModelCheckpoint(monitor="val/bleu4", mode=mode)
    trainer = type("Trainer", (), {"checkpoint_callback": ckpt})()
    export = ExportModelFile(str(tmp_path / "model.safetensors"))
    export.on_load_checkpoint(trainer, None, {"callbacks": {ckpt.state_key: {
        "best_model_path": str(before), "best_model_score": torch.tensor(earlier)}}})
    ckpt.best_model_path = str(after) if later is not None else ""
    ckpt.best_model_score = torch.tensor(later) if later is not None else None
    path, score = export.best_checkpoint(trainer)
    assert (path, score) == ((str(before), pytest.approx(earlier)) if expected == "earlier" else (str(after), pytest.approx(later)))
    before.unlink()  # a best file that is gone is never offered
    assert export.best_checkpoint(trainer)[0] == (str(after) if later is not None else "")
