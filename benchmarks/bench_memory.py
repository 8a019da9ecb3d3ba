"""Peak resident memory (VmHWM) of three jobs, each in its own fresh process:

* `caption`: `Captioner.caption` over Flickr8k test images;
* `train`: a short training run on Flickr8k cached features (real DataModule, Trainer);
* `cache`: random batches read from a synthetic COCO-sized FeatureCache (123,287 images x
  49 x 1280 float16, about 15.5 GB) through `FeatureCache.get`, the DataModule's read path.
  The files are sparse (created by truncate, laid out as captioner/data/cache.py documents), so they
  take no disk space; they are deleted afterwards. Peak RSS must stay far below the cache
  size: the cache is memory-mapped and only the rows asked for are read.

Plus `baseline`: a process that only imports torch, torchvision and captioner.api, for scale.
The file-backed share of RSS (memory-mapped pages, which the kernel can drop at any time)
is reported apart from anonymous memory.

    python benchmarks/bench_memory.py [--model FILE] [--caption-images 64] [--train-steps 200]
                                      [--cache-images 123287] [--cache-batches 300]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_CACHE, check_cache, REPO, add_model_options, captioner_env, emit, flickr8k_records,  # noqa: E402
                     flickr8k_root, load_captioner, machine,
                     model_path, rss_mb)

COCO_IMAGES = 123_287  # Karpathy split: train + restval + val + test


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p, device=False)
    p.add_argument("--caption-images", type=int, default=64)
    p.add_argument("--caption-batch-size", type=int, default=32)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--config", default=f"{REPO / 'configs' / 'base.yaml'},{REPO / 'configs' / 'lstm.yaml'}",
                   help="comma list of composed training configs")
    p.add_argument("--features", default=str(DEFAULT_CACHE), help="Flickr8k FeatureCache for `train`")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--train-images", type=int, default=None, help="first N train images; default all")
    p.add_argument("--cache-images", type=int, default=COCO_IMAGES)
    p.add_argument("--cache-batches", type=int, default=300)
    p.add_argument("--cache-batch-size", type=int, default=64)
    p.add_argument("--scratch", default=tempfile.gettempdir(), help="where the sparse cache is made")
    p.add_argument("--parts", default="baseline,caption,train,cache")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------- children (one each)


def child_baseline(args) -> dict:
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import captioner.api  # noqa: F401
    return {}


def child_caption(args) -> dict:
    paths = [r.path for r in flickr8k_records("test", args.caption_images)]
    captioner = load_captioner(args)
    results = captioner.caption(paths, beam_size=args.beam_size, batch_size=args.caption_batch_size)
    return {"images": len(paths), "captioned": sum(r.ok for r in results), "beam_size": args.beam_size,
            "batch_size": args.caption_batch_size}


def child_train(args) -> dict:
    import logging
    import warnings

    import pytorch_lightning as pl
    import yaml

    from captioner.data.datamodule import CaptionDataModule
    from captioner.model.module import CaptioningModule
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    from captioner.model.module import DecoderSettings, OptimizationConfig
    config: dict = {}
    for path in args.config.split(","):  # composed as `captioner train --config A --config B`
        delta = yaml.safe_load(Path(path).read_text()) or {}
        for section, values in delta.items():
            if isinstance(values, dict) and isinstance(config.get(section), dict):
                config[section] = {**config[section], **{k: ({**config[section].get(k, {}), **v}
                                   if isinstance(v, dict) and isinstance(config[section].get(k), dict) else v)
                                   for k, v in values.items()}}
            else:
                config[section] = values
    model_cfg = config.get("model") or {}
    decoder = DecoderSettings(**(model_cfg.get("decoder") or {}))
    optimization = OptimizationConfig(**{**(model_cfg.get("optimization") or {}), "lr_schedule": "none"})
    data_kw = {**(config.get("data") or {}), "data_root": str(flickr8k_root()), "dataset": "flickr8k",
               "feature_cache": args.features, "train_limit": args.train_images, "val_limit": 1,
               "load_grid": decoder.attention, "num_workers": 0}
    pl.seed_everything(0, verbose=False)
    data = CaptionDataModule(**data_kw)
    check_cache(args.features, [r.image_id for r in data.train_records + data.val_records],  # never rebuild it
                data.hparams.encoder)
    module = CaptioningModule(vocab_size=data.vocab_size, feature_dim=data.feature_dim, decoder=decoder,
                              optimization=optimization, encoder=data.hparams.encoder, mode=data.hparams.mode)
    with tempfile.TemporaryDirectory(prefix="bench-memory-train-") as root:
        trainer = pl.Trainer(max_steps=args.train_steps, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
        trainer.fit(module, data)
    return {"steps": int(trainer.global_step), "train_images": len(data.train_records),
            "batch_size": data.hparams.batch_size, "attention": decoder.attention,
            "config": args.config}


def make_sparse_cache(directory: Path, n: int, length: int = 49, dim: int = 1280) -> int:
    """A complete-looking FeatureCache of n images with sparse (all-zero) data files, in the
    layout captioner/data/cache.py documents (checksums of all-zero rows, fingerprints
    recomputed as the cache does); returns the size of the data files in bytes."""
    from captioner.data import cache as F
    from captioner.model.encoders import encoder_preprocessing

    directory.mkdir(parents=True)
    ids = [f"COCO_{i:012d}.jpg" for i in range(n)]
    zero_grid, zero_pooled = F.np.zeros((length, dim), F.DTYPE), F.np.zeros(dim, F.DTYPE)
    index = {
        "format_version": F.FORMAT_VERSION, "encoder": "efficientnet-lite0", "weights": "synthetic",
        "preprocessing": encoder_preprocessing("efficientnet-lite0").to_dict(), "image_ids": ids,
        "grid_shape": [n, length, dim], "pooled_shape": [n, dim], "dtype": F.DTYPE.str,
        "done": n, "failed": [], "complete": True,
        "checksums": [F.row_checksums(i, zero_grid, zero_pooled) for i in ids],
    }
    index["encoder_fingerprint"], index["fingerprint"] = F.index_fingerprints(index)
    size = 0
    for name, shape in ((F.GRID_FILE, index["grid_shape"]), (F.POOLED_FILE, index["pooled_shape"])):
        nbytes = int(F.np.prod(shape)) * F.DTYPE.itemsize
        with open(directory / name, "wb") as f:
            f.truncate(nbytes)  # sparse: no blocks allocated
        size += nbytes
    (directory / F.INDEX_FILE).write_text(json.dumps(index))
    return size


def child_cache(args) -> dict:
    import numpy as np

    from captioner.data.cache import FeatureCache
    directory = Path(tempfile.mkdtemp(prefix="captioner-bench-memory-", dir=args.scratch))
    try:
        start = time.perf_counter()
        size = make_sparse_cache(directory / "cache", args.cache_images)
        cache = FeatureCache.open(directory / "cache")
        opened = rss_mb()
        rng = np.random.default_rng(0)
        shape = None
        for _ in range(args.cache_batches):
            rows = rng.integers(0, len(cache), args.cache_batch_size)
            feats = cache.get(rows, grid=True)  # what CaptionDataModule._features does per batch
            shape = tuple(feats.grid.shape)
        seconds = time.perf_counter() - start
        disk = sum(os.stat(p).st_blocks * 512 for p in (directory / "cache").iterdir())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"cache_images": args.cache_images, "cache_bytes": size, "cache_gb": round(size / 1e9, 2),
            "disk_blocks_used_mb": round(disk / 2**20, 1), "batches": args.cache_batches,
            "batch_size": args.cache_batch_size, "grid_batch_shape": list(shape),
            "rows_read": args.cache_batches * args.cache_batch_size,
            "rss_after_open": opened, "seconds": round(seconds, 2), "cleaned_up": not directory.exists()}


CHILDREN = {"baseline": child_baseline, "caption": child_caption, "train": child_train, "cache": child_cache}


def run_child(part: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", part], capture_output=True, text=True,
                          env=captioner_env())
    if proc.returncode != 0:
        raise SystemExit(f"bench: memory child {part!r} failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        out = CHILDREN[args.child](args)
        out.update(rss_mb())
        print(json.dumps(out))
        return out
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if "caption" in parts:
        model_path(args.model)  # fail early, in the parent
    results = {part: run_child(part, argv) for part in parts}
    if "cache" in results:
        c = results["cache"]
        c["peak_rss_fraction_of_cache"] = round(c["peak_rss_mb"] * 2**20 / c["cache_bytes"], 4)
    return emit({
        "benchmark": "memory",
        "machine": machine("cpu"),
        "model": str(model_path(args.model)) if "caption" in parts else None,
        "sizes": {"caption_images": args.caption_images, "caption_batch_size": args.caption_batch_size,
                  "beam_size": args.beam_size, "train_steps": args.train_steps, "train_images": args.train_images,
                  "train_config": args.config, "cache_images": args.cache_images,
                  "cache_batches": args.cache_batches, "cache_batch_size": args.cache_batch_size},
        "peak_rss_mb": {part: r["peak_rss_mb"] for part, r in results.items()},
        "cache_gb": results.get("cache", {}).get("cache_gb"),
        "parts": results,
    })


if __name__ == "__main__":
    main()
