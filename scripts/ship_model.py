"""Score a trained model on Flickr8k dev and test (beam 1, 3, 5) and ship it as the package's
default model, with the scores written into its metadata.

    python scripts/ship_model.py runs/flickr8k-gru/model.safetensors \
        --data-root ../shared/datasets/flickr8k --features cache/flickr8k-lite0 \
        [--length-penalty 0.0] [--decoding BEAM,ALPHA] [--out captioner/assets/default.safetensors]

--decoding records the search settings chosen on dev (scripts/tune_decoding.py) in the model
file, so `captioner caption` and the API use them by default.

Prints one JSON object with every score (BLEU-1..4 and how many distinct captions and words
the model wrote). Dev is for choosing; test is reported once.
"""
from __future__ import annotations

import argparse
import json
import time

from captioner.api import DEFAULT_MODEL, Captioner
from captioner.evaluation import evaluate_model
from captioner.model.quantize import PRECISIONS
from captioner.modelfile import save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data-root", default="../shared/datasets/flickr8k")
    parser.add_argument("--features", default="cache/flickr8k-lite0")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="decoder arithmetic, as `captioner caption --precision` (auto: int8 on an x86 CPU)")
    parser.add_argument("--length-penalty", type=float, default=0.0)
    parser.add_argument("--beams", default="1,3,5")
    parser.add_argument("--decoding", default=None, help="BEAM,ALPHA chosen on dev: the model's defaults")
    parser.add_argument("--out", default=str(DEFAULT_MODEL))
    args = parser.parse_args()
    captioner = Captioner.load(args.model, device="cpu", precision=args.precision)
    scores: dict = {}
    for split in ("dev", "test"):
        scores[split] = {}
        for beam in (int(b) for b in args.beams.split(",")):
            start = time.perf_counter()
            m = evaluate_model(args.model, "flickr8k", args.data_root, split=split, beam_size=beam,
                               length_penalty=args.length_penalty, features=args.features, captioner=captioner)
            scores[split][f"beam{beam}"] = {k: round(m[k], 4) for k in ("bleu1", "bleu2", "bleu3", "bleu4",
                                                                        "distinct_captions", "distinct_words")}
            scores[split][f"beam{beam}"]["seconds"] = round(time.perf_counter() - start, 1)
    scores["length_penalty"] = args.length_penalty
    scores["precision"] = captioner.precision
    model = captioner.model
    model.scores = {**model.scores, **scores}
    if args.decoding:
        beam, alpha = args.decoding.split(",")
        model.decoding = {"beam_size": int(beam), "length_penalty": float(alpha)}
    save_model(args.out, model)
    print(json.dumps({"model": args.model, "out": args.out, "scores": scores}, indent=1))


if __name__ == "__main__":
    main()
