"""Choose beam size and length penalty on Flickr8k dev (never test) for a model file.

    python scripts/tune_decoding.py runs/flickr8k-gru/model.safetensors \
        [--beams 1,2,3,5,8] [--alphas 0,0.2,0.5,0.8,1.0] [--features cache/flickr8k-lite0]

Decodes dev from the feature cache for every (beam, alpha) pair and prints one JSON line per
pair, then the pair with the best dev BLEU-4 (ties: the smaller beam, then the smaller alpha).
"""
from __future__ import annotations

import argparse
import json
import warnings

from captioner.api import Captioner
from captioner.data.sources import DatasetWarning
from captioner.evaluation import evaluate_model
from captioner.model.quantize import PRECISIONS


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data-root", default="../shared/datasets/flickr8k")
    parser.add_argument("--features", default="cache/flickr8k-lite0")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="decoder arithmetic, as `captioner caption --precision` (auto: int8 on an x86 CPU)")
    parser.add_argument("--beams", default="1,2,3,5,8")
    parser.add_argument("--alphas", default="0,0.2,0.5,0.8,1.0")
    args = parser.parse_args()
    warnings.simplefilter("ignore", DatasetWarning)
    captioner = Captioner.load(args.model, device="cpu", precision=args.precision)
    results = []
    for beam in (int(b) for b in floats(args.beams)):
        for alpha in floats(args.alphas):  # even one beam: the penalty ranks finished vs open hypotheses
            m = evaluate_model(args.model, "flickr8k", args.data_root, split="dev", beam_size=beam,
                               length_penalty=alpha, features=args.features, captioner=captioner)
            row = {"beam": beam, "alpha": alpha, **{k: round(m[k], 4) for k in ("bleu1", "bleu2", "bleu3", "bleu4")}}
            results.append(row)
            print(json.dumps(row), flush=True)
    best = max(results, key=lambda r: (r["bleu4"], -r["beam"], -r["alpha"]))
    print(json.dumps({"best_on_dev": best, "model": args.model}))


if __name__ == "__main__":
    main()
