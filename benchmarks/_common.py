"""Shared bits of the benchmark scripts: machine facts, timing, JSON output, data paths.

Every script is `python benchmarks/bench_<name>.py [options]`, prints one JSON object on
stdout, and exposes `main(argv) -> dict` so the smoke test can run it in-process. Figures
are ratios against a baseline measured in the same run, so a busy or slow machine moves
both sides alike.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "captioner" / "assets" / "default.safetensors"
DEFAULT_CACHE = REPO / "cache" / "flickr8k-lite0"
DEMO_IMAGES = REPO / "demo" / "images"


def data_root() -> Path:
    """Datasets live under $CAPTIONER_DATA (default ../shared/datasets), as for the tests."""
    return Path(os.environ.get("CAPTIONER_DATA", REPO.parent / "shared" / "datasets"))


def flickr8k_root() -> Path:
    root = data_root() / "flickr8k"
    if not (root / "Flickr8k.token.txt").is_file():
        raise SystemExit(f"benchmarks: Flickr8k not found at {root} (set CAPTIONER_DATA)")
    return root


def flickr8k_records(split: str, limit: int | None = None):
    """The first `limit` records of a Flickr8k split, in the split file's order."""
    import warnings

    from captioner.data.sources import DatasetWarning, read_dataset
    with warnings.catch_warnings():  # the known Flickr8k quirks; not news in a benchmark
        warnings.simplefilter("ignore", DatasetWarning)
        records = [r for r in read_dataset("flickr8k", flickr8k_root(), splits=[split]) if r.split == split]
    if limit is not None and limit > len(records):
        raise SystemExit(f"benchmarks: asked for {limit} {split} images, Flickr8k has {len(records)}")
    return records[:limit]


def check_cache(directory: str | Path, image_ids: Sequence[str], encoder: str | None = None) -> bool:
    """Make sure a benchmark never rebuilds someone's feature cache.

    The DataModule's `ensure_cache` rebuilds a cache directory that does not hold every
    image it needs (or is incomplete, e.g. still being built by another process) for just
    its own images. So: a directory that does not exist yet may be built (returns False);
    an existing one must be a complete cache holding all `image_ids` (returns True), else
    the benchmark stops here without touching it.
    """
    from captioner.data.cache import FeatureCache
    from captioner.errors import FeatureCacheError
    directory = Path(directory)
    if not directory.exists():
        return False
    try:
        cache = FeatureCache.open(directory)
    except FeatureCacheError as exc:
        raise SystemExit(f"benchmarks: {exc}; not touching it (pass --features with a new directory "
                         "to build a cache for this run)") from None
    missing = [i for i in image_ids if i not in cache]
    if missing:
        raise SystemExit(f"benchmarks: {directory} lacks {len(missing)} of the images needed (e.g. "
                         f"{missing[0]}); not touching it (pass --features with a new directory)")
    if encoder is not None:  # ensure_cache also rebuilds for other encoder weights
        from captioner.model.encoders import build_encoder
        if not cache.matches(build_encoder(encoder)):
            raise SystemExit(f"benchmarks: {directory} was built with other encoder weights than {encoder}'s; "
                             "not touching it (pass --features with a new directory)")
    return True


def add_model_options(parser, device: bool = True) -> None:
    """--model, --encoder-backend and (with `device`) --device, as every captioning benchmark
    takes them. The encoder defaults to eager PyTorch: the baseline the published ratios are
    measured against, whatever extras the machine has."""
    parser.add_argument("--model", default=None, help="model file; default: the shipped model")
    parser.add_argument("--encoder-backend", default="eager", choices=("eager", "onnxruntime", "auto"),
                        help="the encoder the figures are measured with (default: eager)")
    if device:
        parser.add_argument("--device", default="cpu")


def load_captioner(args):
    """The `Captioner` that `add_model_options`' options name."""
    from captioner.api import Captioner
    return Captioner.load(model_path(args.model), device=getattr(args, "device", "cpu"),
                          encoder_backend=args.encoder_backend)


def model_path(given: str | None) -> Path:
    """--model FILE, else the shipped default model."""
    path = Path(given) if given else SHIPPED_MODEL
    if not path.is_file():
        raise SystemExit(f"benchmarks: no model at {path} (pass --model FILE)")
    return path


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on."""
    import torch
    import torchvision
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device != "cpu" and torch.cuda.is_available() else None,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (torch.set_num_threads); default: torch's choice")


def apply_threads(args) -> None:
    """The process set-up every captioner entry point makes (glibc malloc tuning,
    captioner/allocator.py), then --threads."""
    from captioner.allocator import keep_freed_memory
    keep_freed_memory()
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every case `repeats` times, round-robin (so drifting machine load hits all cases
    alike), after `warmup` untimed rounds; returns the seconds of each run per case."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            seconds[name].append(timed(fn)[0])
    return seconds


def summary(seconds: Sequence[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(seconds), 4), "min_s": round(min(seconds), 4),
            "runs": len(seconds)}


def rss_mb() -> dict[str, float]:
    """This process's peak and current resident set (MB) from /proc, else getrusage."""
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    fields[key] = round(int(value.split()[0]) / 1024, 1)  # kB -> MB
    except OSError:
        import resource
        fields["VmHWM"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return {"peak_rss_mb": fields.get("VmHWM"), "rss_mb": fields.get("VmRSS"),
            "rss_anon_mb": fields.get("RssAnon"), "rss_file_mb": fields.get("RssFile")}


def emit(result: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(result, indent=2))
    sys.stdout.flush()
    return result


def captioner_env() -> dict[str, str]:
    """Environment for subprocesses: the repository importable even if not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def encoder_only(captioner):
    """A copy of `captioner` whose search does nothing: the same files, thread pool, batching
    and encoder, so timing it gives the encoder-bound rate the search is compared with."""
    import copy

    from captioner.api import CaptionResult

    def empty_search(features, decoding=None, **_):
        return [CaptionResult(image="") for _ in range(features.pooled.shape[0])]

    twin = copy.copy(captioner)
    twin.decode_features = empty_search  # an instance attribute shadows the method
    return twin
