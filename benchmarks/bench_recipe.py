"""The whole Flickr8k recipe, end to end, in one measured run: `captioner features` for every
Flickr8k image into a fresh cache, then `captioner train` with a shipped config (its own run
directory and that fresh cache; nothing else changed) until the config's early stopping ends
it. Reported: feature-extraction time, time from the start of training to the best dev
BLEU-4 checkpoint (the model the run exports), the total, and the 30-minute budget.

The "baseline" here is the budget itself (the quick recipe in under 30 minutes on a 2-core
CPU); the ratio is recipe time / budget. Takes about 7 minutes here: run it on a
quiet machine, nothing else training.

    python benchmarks/bench_recipe.py [--config configs/base.yaml,configs/gru.yaml] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, captioner_env, emit, flickr8k_root, machine  # noqa: E402

BUDGET_S = 30 * 60


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=f"{REPO / 'configs' / 'base.yaml'},{REPO / 'configs' / 'gru.yaml'}",
                   help="comma list of composed training configs")
    p.add_argument("--workdir", default=None,
                   help="where the cache and run go (default: a temporary directory, removed after)")
    p.add_argument("--dataset", default="flickr8k", help="dataset reader (a tiny `folder` set in the smoke test)")
    p.add_argument("--data-root", default=None, help="default: $CAPTIONER_DATA/flickr8k")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="override the config's trainer.max_epochs (smoke runs)")
    p.add_argument("--limit-batches", type=float, default=None,
                   help="trainer.limit_train_batches and limit_val_batches (smoke runs)")
    p.add_argument("--feature-batch-size", type=int, default=64)
    p.add_argument("--feature-workers", type=int, default=2)
    return p.parse_args(argv)


def recipe_config(args, workdir: Path, cache: Path) -> list[str]:
    """`--config` arguments: the recipe's configs, then a delta pointing the run at `workdir`
    (with a CSV log for the dev BLEU-4 history)."""
    run_dir = workdir / "run"
    trainer = {"default_root_dir": str(run_dir), "enable_progress_bar": False,
               "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                          "init_args": {"save_dir": str(run_dir), "name": "csv"}}}
    if args.max_epochs is not None:
        trainer["max_epochs"] = args.max_epochs
    if args.limit_batches is not None:
        trainer["limit_train_batches"] = trainer["limit_val_batches"] = args.limit_batches
    delta = {"trainer": trainer, "data": {"feature_cache": str(cache), "dataset": args.dataset,
                                          "data_root": str(args.data_root)}}
    path = workdir / "recipe-run.yaml"
    path.write_text(yaml.safe_dump(delta, sort_keys=False))
    args_out = []
    for config in [*args.config.split(","), str(path)]:
        args_out += ["--config", config]
    return args_out


def run_step(name: str, argv: list[str]) -> float:
    """Run one `captioner` command; its seconds. Its output goes to stderr (progress, errors):
    streamed when stderr is a real file, else (pytest's capture) relayed when it ends."""
    try:
        sink, stream = sys.stderr.fileno(), True
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        sink, stream = subprocess.PIPE, False
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "captioner", *argv], cwd=REPO, env=captioner_env(),
                          stdout=sink, stderr=sink if stream else subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if not stream:
        sys.stderr.write(proc.stdout or "")
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks: recipe step {name} failed (exit {proc.returncode})")
    return seconds


def val_history(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, val/bleu4) rows of the run's CSV log."""
    rows = []
    for metrics in sorted(run_dir.rglob("metrics.csv")):
        with open(metrics, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("val/bleu4"):
                    rows.append((int(row["epoch"]), float(row["val/bleu4"])))
    return rows


def main(argv=None) -> dict:
    args = parse(argv)
    args.data_root = args.data_root or flickr8k_root()
    made_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="captioner-recipe-")) if made_tmp else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache"
    if cache.exists():
        raise SystemExit(f"benchmarks: {cache} exists; the recipe times a fresh cache (use a new --workdir)")
    try:
        features_s = run_step("features", [
            "features", "--dataset", args.dataset, "--data-root", str(args.data_root), "--out", str(cache),
            "--batch-size", str(args.feature_batch_size), "--workers", str(args.feature_workers)])
        configs = recipe_config(args, workdir, cache)
        train_started = time.time()
        train_s = run_step("train", ["train", *configs])
        best = sorted((workdir / "run").rglob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not best:
            raise SystemExit("benchmarks: the training run saved no best checkpoint")
        to_best_s = best[-1].stat().st_mtime - train_started
        history = val_history(workdir / "run")
        best_epoch, best_bleu4 = max(history, key=lambda row: row[1]) if history else (None, None)
        index = json.loads((cache / "index.json").read_text())
        recipe_s = features_s + to_best_s
        return emit({
            "benchmark": "recipe",
            "config": args.config,
            "sizes": {"dataset": args.dataset, "images": index["done"], "max_epochs": args.max_epochs,
                      "limit_batches": args.limit_batches},
            "features": {"images": index["done"], "seconds": round(features_s, 1),
                         "images_per_s": round(index["done"] / features_s, 2)},
            "training": {"seconds_to_best": round(to_best_s, 1), "seconds_total": round(train_s, 1),
                         "epochs_run": len(history), "best_epoch": best_epoch,
                         "best_dev_bleu4_greedy": best_bleu4,
                         "dev_bleu4_by_epoch": [round(b, 4) for _, b in history]},
            "recipe_seconds_to_best": round(recipe_s, 1),
            "budget_seconds": BUDGET_S,
            "ratio_to_budget": round(recipe_s / BUDGET_S, 3),
            "target_met": recipe_s < BUDGET_S,
            "machine": machine(),
        })
    finally:
        if made_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
