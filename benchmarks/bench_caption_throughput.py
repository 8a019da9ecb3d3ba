"""Captioning throughput (`Captioner.caption`) at beam 1, 3, 5 as a fraction of the
encoder-only pass over the same images.

The baseline is the same `Captioner.caption` call with the search replaced by a no-op
(`decode_features` returns an empty result): same files, same load/preprocess thread pool,
same batching, same encoder; only the decoder's search is missing. The ratio is therefore
what the search costs on top of the work every caption needs anyway.

The cases run round-robin; each round's ratio compares two runs seconds apart, and the
reported ratio is the median over rounds of those paired ratios. This machine's speed drifts
by 20-30% over minutes (other tenants share its memory system), which a ratio of two
medians taken at different moments absorbs as noise; the paired one mostly cancels it.

Also reported, to show where the time goes: the search alone on precomputed encoder
features (per beam), and decode+preprocess alone (the thread pool, no network). When the
decoding runs int8 decoder products (precision auto on an x86 CPU), the float32 decoder runs
in the same rounds at the beams of `--float32-beams`, so the two compare in one run.

    python benchmarks/bench_caption_throughput.py [--model FILE] [--images 256] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_model_options, add_threads_option, apply_threads, emit, encoder_only,  # noqa: E402
                     flickr8k_records, interleaved, load_captioner, machine, model_path, summary)

TARGET_BEAM3_RATIO = 0.85


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--images", type=int, default=256, help="Flickr8k test images (first N)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beams", default="1,3,5", help="comma list of beam sizes")
    p.add_argument("--max-length", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (interleaved); median reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default=None, choices=("auto", "float32", "int8"), help="default: the model's")
    p.add_argument("--float32-beams", default="3",
                   help="comma list: also time the float32 decoder at these beams when --precision gives int8")
    add_threads_option(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    apply_threads(args)
    import torch

    from captioner.model.inference import resolve_precision

    model = model_path(args.model)
    paths = [r.path for r in flickr8k_records("test", args.images)]
    beams = [int(b) for b in args.beams.split(",")]
    captioner = load_captioner(args)
    base = captioner.settings(max_length=args.max_length, precision=args.precision)
    precision = resolve_precision(base.precision, captioner.device)
    float32_beams = [int(b) for b in args.float32_beams.split(",") if b.strip()] if precision != "float32" else []

    def run(c, config):
        def go():
            results = c.caption(paths, config, batch_size=args.batch_size)
            bad = [r for r in results if r.error]
            if bad:
                raise SystemExit(f"bench: {bad[0].image}: {bad[0].error}")
            return results
        return go

    cases = {"encoder_only": run(encoder_only(captioner), base.replace(beam_size=1))}
    cases.update({f"beam{b}": run(captioner, base.replace(beam_size=b)) for b in beams})
    cases.update({f"beam{b}_float32": run(captioner, base.replace(beam_size=b, precision="float32"))
                  for b in float32_beams})
    seconds = interleaved(cases, args.repeats, args.warmup)

    # Decomposition: the search alone on precomputed features, and load+preprocess alone.
    batches = [captioner.encode(torch.stack([captioner.preprocess(p) for p in paths[i:i + args.batch_size]]))
               for i in range(0, len(paths), args.batch_size)]

    def search_only(b, precision_override=None):
        config = base.replace(beam_size=b, precision=precision_override)
        return lambda: [captioner.decode_features(f, config) for f in batches]

    def preprocess_only():
        from concurrent.futures import ThreadPoolExecutor
        import os
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # as iter_captions
            list(pool.map(captioner.preprocess, paths))

    parts = {f"search_only_beam{b}": search_only(b) for b in beams}
    parts.update({f"search_only_beam{b}_float32": search_only(b, "float32") for b in float32_beams})
    parts["load_and_preprocess_only"] = preprocess_only
    part_seconds = interleaved(parts, args.repeats, args.warmup)

    n = len(paths)
    ips = {name: round(n / summary(s)["median_s"], 2) for name, s in {**seconds, **part_seconds}.items()}
    searched = [f"beam{b}" for b in beams] + [f"beam{b}_float32" for b in float32_beams]
    ratios = {name: round(statistics.median(e / s for e, s in zip(seconds["encoder_only"], seconds[name])), 3)
              for name in searched}
    ratios_of_medians = {name: round(ips[name] / ips["encoder_only"], 3) for name in searched}
    beam3 = ratios.get("beam3")
    return emit({
        "benchmark": "caption_throughput",
        "machine": machine(str(captioner.device)),
        "model": str(model),
        "decoders": len(captioner.model.members),
        "decoding": base.to_dict(),
        "precision": precision,
        "sizes": {"images": n, "batch_size": args.batch_size, "beams": beams, "max_length": args.max_length,
                  "repeats": args.repeats, "warmup": args.warmup, "dataset": "flickr8k test (first N)",
                  "float32_beams": float32_beams},
        "images_per_s": ips,
        "ratio_to_encoder_only": ratios,
        "ratio_of_median_throughputs": ratios_of_medians,
        "seconds": {name: summary(s) for name, s in {**seconds, **part_seconds}.items()},
        "target": {"beam3_ratio_at_least": TARGET_BEAM3_RATIO,
                   "met": None if beam3 is None else beam3 >= TARGET_BEAM3_RATIO},
    })


if __name__ == "__main__":
    main()
