"""Which ensemble of trained decoders scores best on Flickr8k dev (never test)?

    python scripts/search_ensembles.py NAME=MODEL NAME=MODEL ... [--beam 5] [--extend 6]
        [--features cache/flickr8k-lite0] [--output results/ensemble-search-dev.jsonl]

Scores every pair of the given model files (`captioner ensemble`'s combination, the
decoders' word distributions averaged per step), then every triple that adds one more model
to one of the `--extend` best pairs. Each row: the members, dev BLEU-1..4 at `--beam`
without a length penalty, the number of distinct captions, and each demo photo's caption
at beam 3 (what `tests/test_default_model.py` checks of a shipped model). Rows print as JSON
lines as they come; `--output` gets them all at the end, sorted by BLEU-4 (atomically).
"""
from __future__ import annotations

import argparse
import itertools
import json
import warnings
from pathlib import Path

from captioner.api import Captioner
from captioner.data.sources import DatasetWarning
from captioner.evaluation import evaluate_model
from captioner.metrics import BLEU_KEYS
from captioner.modelfile import atomic_write_text, combine_models, load_model

DEMO = sorted((Path(__file__).resolve().parents[1] / "demo" / "images").glob("*.jpg"))


def named_models(specs: list[str]) -> dict[str, str]:
    """"NAME=PATH" arguments -> {NAME: PATH}; a bare PATH is named by its parent folder."""
    named = {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).parent.name
        if name in named:
            raise SystemExit(f"two models are named {name!r}: name them NAME=PATH")
        named[name] = path
    if len(named) < 2:
        raise SystemExit("need at least two model files")
    return named


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=MODEL_FILE (or a bare file, named by its folder)")
    parser.add_argument("--data-root", default="../shared/datasets/flickr8k")
    parser.add_argument("--features", default="cache/flickr8k-lite0")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--extend", type=int, default=6, help="triples are grown from this many best pairs")
    parser.add_argument("--limit", type=int, default=None, help="only the first N dev images (a quick check)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", DatasetWarning)
    paths = named_models(args.models)
    models = {name: load_model(path) for name, path in paths.items()}

    def score(members: tuple[str, ...]) -> dict:
        captioner = Captioner(combine_models([models[m] for m in members], names=[paths[m] for m in members]),
                              device="cpu", source="+".join(members))
        scores = evaluate_model(captioner.source, "flickr8k", args.data_root, split="dev", beam_size=args.beam,
                                length_penalty=0.0, limit=args.limit, features=args.features, captioner=captioner)
        row = {"members": list(members), **{k: round(scores[k], 4) for k in BLEU_KEYS},
               "distinct_captions": scores["distinct_captions"],
               "demo": {Path(r.image).name: r.caption for r in captioner.caption(DEMO, beam_size=3)}}
        print(json.dumps(row), flush=True)
        return row

    rows = [score(pair) for pair in itertools.combinations(paths, 2)]
    best_pairs = sorted(rows, key=lambda r: -r["bleu4"])[:args.extend]
    triples = {tuple(sorted({*pair["members"], extra}, key=list(paths).index))
               for pair in best_pairs for extra in paths if extra not in pair["members"]}
    rows += [score(t) for t in sorted(triples)]
    rows.sort(key=lambda r: -r["bleu4"])
    if args.output:
        atomic_write_text(args.output, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
