"""Where captioning time goes: torch.profiler over `Captioner.caption` on Flickr8k test images.

Prints JSON: wall time split into the stages the code marks (image decode + preprocess in
the thread pool, the encoder forward, the search), and the operators with the most self CPU
time. This is the profile the performance work started from (README, Benchmarks).

    python benchmarks/profile_caption.py [--model FILE] [--images 64] [--beam-size 3] [--top 12]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_model_options, add_threads_option, apply_threads, emit, flickr8k_records,  # noqa: E402
                     load_captioner, machine)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p, device=False)
    p.add_argument("--images", type=int, default=64, help="Flickr8k test images (first N)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="operators listed")
    add_threads_option(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    apply_threads(args)
    from torch.profiler import ProfilerActivity, profile, record_function

    captioner = load_captioner(args)
    paths = [r.path for r in flickr8k_records("test", args.images)]
    captioner.caption(paths[: args.batch_size], beam_size=args.beam_size, batch_size=args.batch_size)  # warm-up

    stages = {"encoder": 0.0, "search": 0.0}
    encode, search = captioner.encoder.forward, captioner.decode_features

    def timed(name, fn):
        def wrapper(*a, **k):
            with record_function(f"captioner::{name}"):
                start = time.perf_counter()
                out = fn(*a, **k)
                stages[name] += time.perf_counter() - start
                return out
        return wrapper

    captioner.encoder.forward = timed("encoder", encode)
    captioner.decode_features = timed("search", search)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        results = captioner.caption(paths, beam_size=args.beam_size, batch_size=args.batch_size)
        wall = time.perf_counter() - start
    assert all(r.ok for r in results)
    ops = sorted((e for e in prof.key_averages() if not e.key.startswith("captioner::")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in ops) or 1
    other = wall - stages["encoder"] - stages["search"]
    return emit({
        "benchmark": "profile_caption",
        "images": len(paths), "beam_size": args.beam_size, "batch_size": args.batch_size,
        "wall_s": round(wall, 3),
        "stage_share_of_wall": {"encoder": round(stages["encoder"] / wall, 3),
                                "search": round(stages["search"] / wall, 3),
                                "decode_preprocess_and_rest": round(other / wall, 3)},
        "top_ops_self_cpu": [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
                              "share": round(e.self_cpu_time_total / total_self, 3), "calls": e.count}
                             for e in ops[: args.top]],
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
