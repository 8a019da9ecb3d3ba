"""Training end to end on a small Flickr8k slice, through the real `captioner train`
(LightningCLI): the model overfits, export/load gives identical captions, DDP validation BLEU
equals single-process BLEU for the same weights, encoder fine-tuning and self-critical training
start from a trained decoder. Long: these run with `-m slow` (CI runs them)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from captioner.api import Captioner
from captioner.data.sources import read_dataset
from captioner.export import load_module
from captioner.metrics import bleu_scores
from captioner.model.search import greedy

pytestmark = pytest.mark.slow

TRAIN_IMAGES, VAL_IMAGES = 24, 15  # 15: odd, so a 2-process sampler must pad with a repeat


def write_config(tmp: Path, root: Path, cache: Path, **overrides) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 30, "gradient_clip_val": 5.0,
            "log_every_n_steps": 1, "default_root_dir": str(tmp / "run"), "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "check_val_every_n_epoch": 10,
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp / "run"), "name": "csv", "version": 0}},
            "callbacks": [
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / "ckpt"), "monitor": "val/bleu4", "mode": "max",
                               "save_last": True, "filename": "best"}},
                {"class_path": "captioner.train.ExportModelFile",
                 "init_args": {"output": str(tmp / "model.safetensors")}},
            ],
        },
        "model": {"decoder": {"cell": "gru", "embed_dim": 64, "hidden_dim": 128, "dropout": 0.0},
                  "optimization": {"lr": 3e-3, "lr_schedule": "none"}},
        "data": {"dataset": "flickr8k", "data_root": str(root), "feature_cache": str(cache),
                 "train_split": "train", "val_split": "train", "train_limit": TRAIN_IMAGES,
                 "val_limit": TRAIN_IMAGES, "min_word_freq": 1, "batch_size": 40, "val_batch_size": 8},
    }
    for key, value in overrides.items():
        *sections, name = key.split("__")
        target = config
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "captioner", "train", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flickr8k_root):
    tmp = tmp_path_factory.mktemp("train")
    config = write_config(tmp, flickr8k_root, tmp / "cache")
    train(config)
    return tmp, config


def slice_records(root: Path, n: int, split: str = "train"):
    return read_dataset("flickr8k", root, splits=[split])[:n]


def test_tiny_run_overfits(trained, flickr8k_root):
    tmp, _ = trained
    rows = metrics(tmp / "run")
    losses = column(rows, "train/loss")
    assert losses[-1] < 0.5 * losses[0], losses
    bleu4 = column(rows, "val/bleu4")
    assert bleu4[-1] > 0.3, bleu4  # BLEU on the training images after overfitting

    # An untrained model of the same shape scores far lower on the same images.
    records = slice_records(flickr8k_root, TRAIN_IMAGES)
    trained_model = Captioner.load(tmp / "model.safetensors", device="cpu")
    refs = [list(r.captions) for r in records]
    hyps = [r.caption for r in trained_model.caption([r.path for r in records], beam_size=1)]
    untrained = Captioner.load(tmp / "model.safetensors", device="cpu")
    for p in untrained.decoder.parameters():
        p.data.normal_(0, 0.05)
    base = [r.caption for r in untrained.caption([r.path for r in records], beam_size=1)]
    assert bleu_scores(hyps, refs)["bleu4"] > bleu_scores(base, refs)["bleu4"] + 0.25
    assert len(set(hyps)) > TRAIN_IMAGES // 2  # not one caption for every image


def test_fast_dev_run_leaves_the_trained_model_file_alone(trained):
    """A smoke test of a real config (`--trainer.fast_dev_run`) runs its steps but must not
    replace the model the config's full run exported."""
    tmp, config = trained
    model = tmp / "model.safetensors"
    before = model.read_bytes()
    proc = train(config, "--trainer.fast_dev_run", "1")
    assert f"{model} not written" in proc.stdout
    assert model.read_bytes() == before


def test_export_round_trip_gives_identical_captions(trained, flickr8k_root):
    tmp, _ = trained
    out = tmp / "exported.safetensors"
    proc = subprocess.run([sys.executable, "-m", "captioner", "export", str(tmp / "ckpt" / "best.ckpt"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    images = [r.path for r in slice_records(flickr8k_root, 8)]
    a = Captioner.load(out, device="cpu").caption(images, beam_size=3, n_best=2)
    b = Captioner.load(tmp / "model.safetensors", device="cpu").caption(images, beam_size=3, n_best=2)
    assert [r.to_json() for r in a] == [r.to_json() for r in b]

    # and the checkpoint's own greedy decode (LightningModule) gives the same captions
    module = load_module(tmp / "ckpt" / "best.ckpt").eval()
    cap = Captioner.load(out, device="cpu")
    batch = torch.stack([cap.preprocess(p) for p in images])
    with torch.inference_mode():
        feats = cap.encoder(batch)
        result = greedy(module.decoder, module.decoder.memory(feats.grid, feats.pooled), 30)
    assert [module.vocabulary.decode(t[0].tolist()) for t in result.tokens] == \
        [r.caption for r in cap.caption(images, beam_size=1)]


def test_export_refuses_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "captioner", "export", str(tmp_path / "no.ckpt"),
                           str(tmp_path / "o.safetensors")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("captioner: error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_ddp_validation_bleu_equals_single_process(trained, flickr8k_root, tmp_path):
    """Validate the same weights on 15 dev images with 1 and with 2 DDP processes."""
    tmp, _ = trained
    results = {}
    for devices in (1, 2):
        run = tmp_path / f"ddp{devices}"
        run.mkdir()
        # its own cache: the training cache holds train images only, and a cache of other
        # images is refused, never overwritten; the 1-process run builds it, the 2-process reuses it
        config = write_config(run, flickr8k_root, tmp_path / "cache", data__val_split="dev",
                              data__val_limit=VAL_IMAGES)
        cfg = yaml.safe_load(config.read_text())
        cfg["trainer"]["callbacks"] = []
        cfg["trainer"].update(devices=devices, strategy="ddp" if devices > 1 else "auto")
        config.write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([sys.executable, "-m", "captioner", "train", "validate", "--config", str(config),
                               "--ckpt_path", str(tmp / "ckpt" / "best.ckpt")],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = metrics(run / "run")
        results[devices] = {k: column(rows, k)[-1] for k in ("val/bleu1", "val/bleu4", "val/n_images")}
    assert results[2]["val/n_images"] == VAL_IMAGES  # every dev image exactly once
    assert results[1] == pytest.approx(results[2], abs=1e-9)


def test_encoder_fine_tuning_starts_from_a_trained_decoder(trained, tmp_path, flickr8k_root):
    """Raw-image mode with the encoder's last block open, from the cached-feature run's
    decoder (model.init_decoder): the first steps already have the trained model's loss, the
    opened block trains in train mode (its BatchNorm statistics move; the frozen blocks' do
    not), and the exported file carries the fine-tuned encoder."""
    tmp, _ = trained
    start = tmp / "model.safetensors"
    finetune = write_config(tmp_path, flickr8k_root, tmp / "cache", model__init_decoder=str(start),
                            model__finetune={"blocks": 1, "lr": 1e-4}, data__mode="images", trainer__max_epochs=1,
                            trainer__check_val_every_n_epoch=1)
    train(finetune)
    out = tmp_path / "model.safetensors"
    first_loss = column(metrics(tmp_path / "run"), "train/loss")[0]
    trained_losses = column(metrics(tmp / "run"), "train/loss")
    assert first_loss < 0.5 * trained_losses[0] and first_loss < 2 * trained_losses[-1] + 0.5
    finetuned = Captioner.load(out, device="cpu")
    original = Captioner.load(start, device="cpu")
    assert finetuned.model.encoder["finetuned"] is True
    changed = [k for k, v in finetuned.encoder.state_dict().items()
               if not torch.equal(v, original.encoder.state_dict()[k])]
    assert changed and all(k.startswith(f"body.{len(original.encoder.blocks) - 1}.") for k in changed)
    assert any("running_mean" in k for k in changed)  # the opened block trained in train mode

    # A decoder that does not fit this run's settings: one line naming the file, no traceback.
    proc = subprocess.run([sys.executable, "-m", "captioner", "train", "--config", str(finetune),
                           "--model.decoder.hidden_dim", "32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"captioner: error: {start}: its decoder")


def test_self_critical_training_starts_from_a_trained_decoder(trained, tmp_path, flickr8k_root):
    """`model.self_critical` through the real CLI: from the cached-feature run's decoder it
    trains on sampled captions' BLEU-4 (logged as train/reward), validates greedily and
    exports a loadable model; with every caption per epoch it refuses in one line."""
    tmp, _ = trained
    start = tmp / "model.safetensors"
    config = write_config(tmp_path, flickr8k_root, tmp / "cache", model__init_decoder=str(start),
                          model__self_critical={"reward": "bleu4", "samples": 3}, model__optimization__lr=1e-4,
                          data__captions_per_epoch="one", data__batch_size=8, trainer__max_epochs=2,
                          trainer__check_val_every_n_epoch=1)
    train(config)
    rows = metrics(tmp_path / "run")
    rewards = column(rows, "train/reward")
    assert rewards and all(0.0 <= r <= 1.0 for r in rewards)
    assert column(rows, "val/bleu4")[-1] > 0.3  # still the overfit model's captions, not undone
    model = Captioner.load(tmp_path / "model.safetensors", device="cpu")
    records = slice_records(flickr8k_root, 2)
    assert all(r.caption for r in model.caption([r.path for r in records], beam_size=1))

    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["captions_per_epoch"] = "all"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "captioner", "train", "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "captioner: error: self_critical needs data.captions_per_epoch: one (each image once per epoch; "
        "its samples are scored against all its captions)")
