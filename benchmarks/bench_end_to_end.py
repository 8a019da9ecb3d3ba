"""End to end: `captioner caption` over Flickr8k test images at the model's default decoding,
one fresh process per run (start-up, model load, image decoding, encoder and search), for this
checkout with the eager encoder and with the ONNX Runtime encoder, against another checkout
(`--baseline-checkout DIR`: e.g. the previous release, `git worktree add /tmp/v0.9.0 v0.9.0`)
or, without one, against this checkout's eager encoder. Runs are interleaved; images/s and
ratios against the baseline, plus how many captions each variant shares with the baseline.
Each round also runs every variant on one image, so the start-up (imports, model load, an
ONNX Runtime model) is reported apart and the steady rate is (N - 1) images over the difference.

    python benchmarks/bench_end_to_end.py [--images 512] [--repeats 3] [--baseline-checkout DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, flickr8k_records, machine  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512, help="Flickr8k test images (first N)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each first (file cache, ONNX export)")
    p.add_argument("--baseline-checkout", default=None,
                   help="another checkout of captioner (its own default model and decoding) as the baseline")
    p.add_argument("--baseline-name", default=None, help="how to name the baseline in the output")
    return p.parse_args(argv)


def variants(args) -> dict[str, tuple[Path, dict[str, str]]]:
    """name -> (checkout, environment) of each `captioner caption` run."""
    here = {**os.environ, "PYTHONPATH": str(REPO)}
    found: dict[str, tuple[Path, dict[str, str]]] = {}
    if args.baseline_checkout:
        checkout = Path(args.baseline_checkout).resolve()
        found[args.baseline_name or f"baseline ({checkout.name})"] = (checkout, {**os.environ, "PYTHONPATH": str(checkout)})
    found["this checkout, eager encoder"] = (REPO, {**here, "CAPTIONER_ENCODER_BACKEND": "eager"})
    if importlib.util.find_spec("onnxruntime") is not None:
        found["this checkout, ONNX Runtime encoder"] = (REPO, {**here, "CAPTIONER_ENCODER_BACKEND": "onnxruntime"})
    return found


def run_once(checkout: Path, env: dict[str, str], paths: list[str]) -> tuple[float, list[str]]:
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "captioner", "caption", *paths], cwd=checkout, env=env,
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=3600)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"captioner caption failed in {checkout}: {proc.stderr.strip()[-2000:]}")
        out.seek(0)
        return seconds, [line.rstrip("\n").split("\t", 1)[-1] for line in out]


def main(argv=None) -> dict:
    args = parse(argv)
    paths = [str(r.path) for r in flickr8k_records("test", args.images)]
    cases = variants(args)
    for _ in range(args.warmup):
        for checkout, env in cases.values():
            run_once(checkout, env, paths)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    startup: dict[str, list[float]] = {name: [] for name in cases}
    captions: dict[str, list[str]] = {}
    load = {"before": os.getloadavg()[0]}
    for _ in range(args.repeats):
        for name, (checkout, env) in cases.items():
            startup[name].append(run_once(checkout, env, paths[:1])[0])
            took, captions[name] = run_once(checkout, env, paths)
            seconds[name].append(took)
    load["after"] = os.getloadavg()[0]
    baseline = next(iter(cases))
    base_median = statistics.median(seconds[baseline])
    steady = {name: statistics.median((len(paths) - 1) / max(s - o, 1e-9) for s, o in zip(seconds[name], startup[name]))
              for name in cases}
    results = {}
    for name in cases:
        median = statistics.median(seconds[name])
        paired = statistics.median(b / s for b, s in zip(seconds[baseline], seconds[name]))
        results[name] = {"images_per_s": round(len(paths) / median, 2), "median_s": round(median, 2),
                         "runs_s": [round(s, 2) for s in seconds[name]],
                         "one_image_s": round(statistics.median(startup[name]), 2),
                         "steady_images_per_s": round(steady[name], 2),
                         "speedup_vs_baseline": round(paired, 3),
                         "speedup_of_medians": round(base_median / median, 3),
                         "steady_speedup_vs_baseline": round(steady[name] / steady[baseline], 3),
                         "captions_same_as_baseline": sum(a == b for a, b in zip(captions[name], captions[baseline]))}
    return emit({"benchmark": "end_to_end", "machine": machine(), "load_average_1min": load,
                 "sizes": {"images": len(paths), "repeats": args.repeats, "warmup": args.warmup},
                 "what": "wall time of `captioner caption PATHS...` in a fresh process, default model and decoding",
                 "baseline": baseline, "variants": results})


if __name__ == "__main__":
    main()
