"""One image per call (the demo, a single `captioner caption photo.jpg`, an API call per
request): the latency of `Captioner.caption(path)` at the model's default decoding against the
encoder's own one-image latency, the same call with the search replaced by a no-op.

The cases run round-robin over the same images (warm: the model is loaded once, as in a
server); each figure is the median per-call latency, and the ratio is the median of the
per-round ratios.

    python benchmarks/bench_single_image.py [--model FILE] [--images 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_model_options, add_threads_option, apply_threads, emit, encoder_only,  # noqa: E402
                     flickr8k_records, load_captioner, machine, model_path)

TARGET_RATIO = 2.0


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--images", type=int, default=32, help="Flickr8k test images (first N), one per call")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (interleaved)")
    p.add_argument("--beam-size", type=int, default=None, help="default: the model's")
    add_threads_option(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    apply_threads(args)
    model = model_path(args.model)
    paths = [r.path for r in flickr8k_records("test", args.images)]
    captioner = load_captioner(args)
    config = captioner.settings(beam_size=args.beam_size)

    def per_call(c) -> float:
        start = time.perf_counter()
        for path in paths:
            if c.caption(path, config, batch_size=1)[0].error:
                raise SystemExit(f"bench: {path}: unreadable")
        return (time.perf_counter() - start) / len(paths)

    cases = {"encoder_only": encoder_only(captioner), "caption": captioner}
    for c in cases.values():
        per_call(c)  # warm-up: lazy initialisation in torch and Pillow
    seconds = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, c in cases.items():
            seconds[name].append(per_call(c))
    ratio = round(statistics.median(c / e for c, e in zip(seconds["caption"], seconds["encoder_only"])), 3)
    return emit({
        "benchmark": "single_image",
        "machine": machine(str(captioner.device)),
        "model": str(model),
        "decoders": len(captioner.model.members),
        "encoder_backend": captioner.encoder_backend_in_use,
        "decoding": config.to_dict(),
        "sizes": {"images": len(paths), "repeats": args.repeats, "calls_per_round": len(paths)},
        "ms_per_call": {name: round(1000 * statistics.median(s), 2) for name, s in seconds.items()},
        "ratio_to_encoder_only": ratio,
        "target": {"ratio_at_most": TARGET_RATIO, "met": ratio <= TARGET_RATIO},
    })


if __name__ == "__main__":
    main()
