"""Batched beam search (a batch of images x beams as one tensor program) against the same
beam search run one image at a time: same model, same features, captions asserted equal.

Features come from a FeatureCache, so the encoder is out of the picture: this measures the
search alone. When the cache directory does not exist yet it is built for exactly the
images used (an existing directory is never rebuilt or modified).

    python benchmarks/bench_batched_beam.py [--model FILE] [--features cache/flickr8k-lite0]
                                            [--images 256] [--batch-size 32] [--beam-size 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_CACHE, add_model_options, add_threads_option, apply_threads, check_cache, emit,  # noqa: E402
                     flickr8k_records, interleaved, load_captioner, machine, model_path, summary)

TARGET_SPEEDUP = 5.0


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--features", default=str(DEFAULT_CACHE), help="FeatureCache directory")
    p.add_argument("--images", type=int, default=256, help="Flickr8k test images (first N)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (interleaved); median reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default=None, choices=("auto", "float32", "int8"), help="default: the model's")
    add_threads_option(p)
    return p.parse_args(argv)


def open_cache(directory: Path, records, encoder_name: str):
    """The cache at `directory`; built for `records` only if the directory does not exist."""
    from captioner.data.cache import FeatureCache
    from captioner.data.extract import ensure_cache
    if not check_cache(directory, [r.image_id for r in records], encoder_name):
        return ensure_cache(directory, encoder_name, [r.path for r in records], [r.image_id for r in records],
                            workers=0, progress=False), True
    return FeatureCache.open(directory), False


def main(argv=None) -> dict:
    args = parse(argv)
    apply_threads(args)
    from captioner.modelfile import load_model

    model = model_path(args.model)
    records = flickr8k_records("test", args.images)
    encoder_name = load_model(model).encoder["name"]
    cache, built = open_cache(Path(args.features), records, encoder_name)  # before the slow part
    captioner = load_captioner(args)
    from captioner.model.encoders import Features
    feats = cache.get([cache.index_of(r.image_id) for r in records], grid=captioner.has_attention)
    n, k = len(records), args.beam_size
    config = captioner.settings(beam_size=k, max_length=args.max_length, precision=args.precision)

    def sliced(start, stop):
        return Features(None if feats.grid is None else feats.grid[start:stop], feats.pooled[start:stop])

    outputs = {}

    def batched():
        outputs["batched"] = [r for i in range(0, n, args.batch_size)
                              for r in captioner.decode_features(sliced(i, i + args.batch_size), config)]

    def one_by_one():
        outputs["single"] = [r for i in range(n) for r in captioner.decode_features(sliced(i, i + 1), config)]

    seconds = interleaved({"batched": batched, "one_at_a_time": one_by_one}, args.repeats, args.warmup)

    batched_caps = [r.caption for r in outputs["batched"]]
    single_caps = [r.caption for r in outputs["single"]]
    batched_lp = [r.log_prob for r in outputs["batched"]]
    single_lp = [r.log_prob for r in outputs["single"]]
    mismatches = [i for i, (a, b) in enumerate(zip(batched_caps, single_caps)) if a != b]

    t_batched = summary(seconds["batched"])["median_s"]
    t_single = summary(seconds["one_at_a_time"])["median_s"]
    speedup = round(t_single / t_batched, 2)
    result = emit({
        "benchmark": "batched_beam",
        "machine": machine(str(captioner.device)),
        "model": str(model),
        "decoders": len(captioner.model.members),
        "decoding": config.to_dict(),
        "sizes": {"images": n, "batch_size": args.batch_size, "beam_size": k, "max_length": args.max_length,
                  "repeats": args.repeats, "warmup": args.warmup, "features": str(args.features),
                  "cache_built_for_this_run": built, "dataset": "flickr8k test (first N)"},
        "images_per_s": {"batched": round(n / t_batched, 2), "one_at_a_time": round(n / t_single, 2)},
        "seconds": {"batched": summary(seconds["batched"]), "one_at_a_time": summary(seconds["one_at_a_time"])},
        "speedup": speedup,
        "captions_equal": not mismatches,
        "captions_compared": n,
        "max_abs_log_prob_diff": round(max(abs(a - b) for a, b in zip(batched_lp, single_lp)), 7),
        "mismatches": [{"row": i, "batched": batched_caps[i], "single": single_caps[i]} for i in mismatches[:5]],
        "example_caption": batched_caps[0],
        "target": {"speedup_at_least": TARGET_SPEEDUP, "met": speedup >= TARGET_SPEEDUP},
    })
    if mismatches:
        raise SystemExit(f"bench: batched and one-at-a-time beam search disagree on {len(mismatches)} of {n} images")
    return result


if __name__ == "__main__":
    main()
