"""Image decoding + preprocessing: large photos with JPEG draft mode (decode at 1/2, 1/4 or
1/8 scale, as `Captioner.preprocess` does) against a full decode, and 224 px images.

The large photos are made for the run: the demo photos upscaled to 4000x3000 with a little
sensor-like noise (so they compress like real 12 MP photos rather than like smooth
upscales) and saved as JPEG quality 90 in a temporary directory. The 224 px images are
Flickr8k's. Each image is decoded with `load_image` and put through the model's transform
(`Preprocessing.transform()`), one at a time in one thread.

    python benchmarks/bench_image_decoding.py [--model FILE] [--large-images 8] [--small-images 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_threads_option, apply_threads, DEMO_IMAGES, SHIPPED_MODEL, emit, flickr8k_records, interleaved, machine, summary  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model file whose preprocessing is used; default: the shipped model, "
                        "else EfficientNet-Lite0's spec")
    p.add_argument("--large-images", type=int, default=8, help="generated large JPEGs")
    p.add_argument("--size", default="4000x3000", help="WxH of the generated JPEGs")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--small-images", type=int, default=64, help="Flickr8k test images (224 px)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (interleaved); median reported")
    p.add_argument("--warmup", type=int, default=1)
    add_threads_option(p)
    return p.parse_args(argv)


def preprocessing_spec(model: str | None):
    from captioner.model.encoders import Preprocessing, encoder_preprocessing
    path = Path(model) if model else SHIPPED_MODEL
    if path.is_file():
        from captioner.modelfile import load_model
        return Preprocessing.from_dict(load_model(path).encoder["preprocessing"]), str(path)
    if model:
        raise SystemExit(f"bench: no model at {path}")
    return encoder_preprocessing("efficientnet-lite0"), "efficientnet-lite0 (no model file)"


def make_large_jpegs(out_dir: Path, count: int, size: tuple[int, int], quality: int) -> list[Path]:
    """Photo-like large JPEGs: demo photos upscaled, plus mild Gaussian noise."""
    import numpy as np
    from PIL import Image

    sources = sorted(DEMO_IMAGES.glob("*.jpg"))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as src:
            big = src.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(big, dtype=np.int16) + rng.normal(0, 6, (size[1], size[0], 1)).astype(np.int16)
        path = out_dir / f"large-{i:02d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=quality)
        paths.append(path)
    return paths


def main(argv=None) -> dict:
    args = parse(argv)
    apply_threads(args)
    from captioner.images import load_image

    spec, spec_source = preprocessing_spec(args.model)
    transform = spec.transform()
    width, height = (int(v) for v in args.size.lower().split("x"))
    small = [r.path for r in flickr8k_records("test", args.small_images)]

    with tempfile.TemporaryDirectory(prefix="bench-decoding-") as tmp:
        large = make_large_jpegs(Path(tmp), args.large_images, (width, height), args.quality)
        mean_bytes = sum(os.path.getsize(p) for p in large) / len(large)

        def each(paths, **load):
            return lambda: [transform(load_image(p, **load)) for p in paths]

        def decode_only(paths, **load):
            return lambda: [load_image(p, **load) for p in paths]

        draft = {"draft_size": spec.draft_size}
        cases = {
            "large_draft": each(large, **draft),
            "large_no_draft": each(large),
            "small_224": each(small, **draft),
            "large_draft_decode_only": decode_only(large, **draft),
            "large_no_draft_decode_only": decode_only(large),
        }
        seconds = interleaved(cases, args.repeats, args.warmup)
        drafted = load_image(large[0], **draft).size
        shape = tuple(each(large[:1], **draft)()[0].shape)

    counts = {"large_draft": len(large), "large_no_draft": len(large), "small_224": len(small),
              "large_draft_decode_only": len(large), "large_no_draft_decode_only": len(large)}
    ips = {name: round(counts[name] / summary(s)["median_s"], 2) for name, s in seconds.items()}
    return emit({
        "benchmark": "image_decoding",
        "machine": machine("cpu"),
        "preprocessing": {**spec.to_dict(), "from": spec_source, "draft_size": list(spec.draft_size)},
        "sizes": {"large_images": len(large), "large_size": [width, height], "jpeg_quality": args.quality,
                  "large_mean_mb": round(mean_bytes / 2**20, 2), "large_decoded_with_draft_to": list(drafted),
                  "small_images": len(small), "small_size": [224, 224], "output_tensor": list(shape),
                  "repeats": args.repeats, "warmup": args.warmup, "python_threads": "1 (one image at a time, in the calling thread)"},
        "images_per_s": {"large_with_draft": ips["large_draft"], "large_without_draft": ips["large_no_draft"],
                         "small_224": ips["small_224"],
                         "large_with_draft_decode_only": ips["large_draft_decode_only"],
                         "large_without_draft_decode_only": ips["large_no_draft_decode_only"]},
        "draft_speedup": round(ips["large_draft"] / ips["large_no_draft"], 2),
        "large_with_draft_vs_small_224": round(ips["large_draft"] / ips["small_224"], 3),
        "seconds": {name: summary(s) for name, s in seconds.items()},
    })


if __name__ == "__main__":
    main()
