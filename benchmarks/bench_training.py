"""One training epoch on cached features against one epoch with the encoder in the loop
(`data.mode: images`, raw JPEGs decoded, augmented and encoded every step): same decoder
(the `model:` section of the config), same images and captions, same batch size, the real
CaptioningModule + CaptionDataModule under a pl.Trainer (one epoch, no validation, no
logger, no checkpoints).

Reported per mode: seconds for the epoch, steps, and how that time splits between waiting
for the batch (data loading/collation, in the main process with num_workers=0) and the
training step itself (forward, backward, optimizer).

    python benchmarks/bench_training.py [--config configs/base.yaml,configs/lstm.yaml] [--train-images 256]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_threads_option, apply_threads, check_cache, DEFAULT_CACHE, REPO, emit, flickr8k_root, machine  # noqa: E402

TARGET_RATIO = 10.0


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=f"{REPO / 'configs' / 'base.yaml'},{REPO / 'configs' / 'lstm.yaml'}",
                   help="comma list of composed training configs whose model: and data: sections are used")
    p.add_argument("--features", default=str(DEFAULT_CACHE),
                   help="FeatureCache directory (built for the subset if it does not exist)")
    p.add_argument("--train-images", type=int, default=256, help="first N Flickr8k train images")
    p.add_argument("--captions", choices=("all", "one"), default="all",
                   help="captions per image per epoch (all: every pair, 5 per Flickr8k image)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--modes", default="features,images", help="which modes to run")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu, gpu)")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on a GPU")
    add_threads_option(p)
    return p.parse_args(argv)


def _callback():
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Epoch wall time, split into time inside training steps and time between them."""

        def __init__(self) -> None:
            self.epoch_s = self.step_s = 0.0
            self.steps = 0
            self._t0 = self._step_start = 0.0

        def on_train_epoch_start(self, trainer, module) -> None:
            self._t0 = time.perf_counter()

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self._step_start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.step_s += time.perf_counter() - self._step_start
            self.steps += 1

        def on_train_epoch_end(self, trainer, module) -> None:
            self.epoch_s = time.perf_counter() - self._t0

    return StepTimer()


def run_epoch(mode: str, config: dict, args, root_dir: str) -> dict:
    import pytorch_lightning as pl

    from captioner.data.datamodule import CaptionDataModule
    from captioner.model.module import CaptioningModule

    from captioner.model.module import DecoderSettings, OptimizationConfig
    model_cfg = config.get("model") or {}
    decoder = DecoderSettings(**(model_cfg.get("decoder") or {}))
    # No validation runs, so a schedule that waits on val/bleu4 cannot step; the schedule
    # does not change the cost of an epoch.
    optimization = OptimizationConfig(**{**(model_cfg.get("optimization") or {}), "lr_schedule": "none"})
    data_kw = dict(config.get("data") or {})
    data_kw.update(data_root=str(flickr8k_root()), dataset="flickr8k", mode=mode, feature_cache=args.features,
                   train_limit=args.train_images, val_limit=1, captions_per_epoch=args.captions,
                   num_workers=args.workers, load_grid=decoder.attention)
    if args.batch_size:
        data_kw["batch_size"] = args.batch_size
    pl.seed_everything(0, verbose=False)
    setup_start = time.perf_counter()
    data = CaptionDataModule(**data_kw)
    if mode == "features":  # setup() would rebuild an unsuitable cache: refuse instead
        check_cache(args.features, [r.image_id for r in data.train_records + data.val_records],
                    data.hparams.encoder)
    module = CaptioningModule(vocab_size=data.vocab_size, feature_dim=data.feature_dim, mode=mode,
                              encoder=data.hparams.encoder, decoder=decoder, optimization=optimization)
    timer = _callback()
    trainer = pl.Trainer(max_epochs=1, accelerator=args.accelerator, devices=1, precision=args.precision,
                         logger=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], default_root_dir=root_dir,
                         gradient_clip_val=(config.get("trainer") or {}).get("gradient_clip_val"))
    trainer.fit(module, data)
    total = time.perf_counter() - setup_start
    return {"epoch_s": round(timer.epoch_s, 3), "steps": timer.steps,
            "samples": len(data.train_set), "images": len(data.train_records),
            "in_training_step_s": round(timer.step_s, 3),
            "between_steps_s": round(timer.epoch_s - timer.step_s, 3),
            "samples_per_s": round(len(data.train_set) / timer.epoch_s, 1),
            "setup_and_teardown_s": round(total - timer.epoch_s, 3)}


def compose(paths: str) -> dict:
    """Configs merged as `captioner train --config A --config B` merges them (nested dicts)."""
    import yaml

    def merge(base: dict, delta: dict) -> dict:
        out = dict(base)
        for key, value in delta.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    config: dict = {}
    for path in paths.split(","):
        config = merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def main(argv=None) -> dict:
    args = parse(argv)
    apply_threads(args)
    import logging
    import warnings

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    config = compose(args.config)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-training-") as root_dir:
        epochs = {mode: run_epoch(mode, config, args, root_dir) for mode in modes}
    ratio = None
    if {"features", "images"} <= set(epochs):
        ratio = round(epochs["images"]["epoch_s"] / epochs["features"]["epoch_s"], 2)
    batch_size = args.batch_size or (config.get("data") or {}).get("batch_size", 64)
    return emit({
        "benchmark": "training",
        "machine": machine("cpu" if args.accelerator == "cpu" else "cuda"),
        "config": str(args.config),
        "decoder": (config.get("model") or {}).get("decoder"),
        "sizes": {"train_images": args.train_images, "captions_per_epoch": args.captions,
                  "batch_size": batch_size, "workers": args.workers, "features": str(args.features),
                  "accelerator": args.accelerator, "precision": args.precision,
                  "lr_schedule": "none (no validation in this benchmark)",
                  "dataset": "flickr8k train (first N)"},
        "epochs": epochs,
        "seconds_per_epoch": {m: e["epoch_s"] for m, e in epochs.items()},
        "speedup_features_over_images": ratio,
        "target": {"speedup_at_least": TARGET_RATIO, "met": None if ratio is None else ratio >= TARGET_RATIO},
    })


if __name__ == "__main__":
    main()
