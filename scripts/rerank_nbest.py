"""Does reranking the beam's n-best list raise corpus BLEU on Flickr8k dev (never test)?

    python scripts/rerank_nbest.py [MODEL] [--beam 5] [--samples 20] [--temperatures 0.5,1,2]
        [--features cache/flickr8k-lite0] [--output results/rerank-default-dev.json]

Minimum-Bayes-risk reranking (Kumar & Byrne 2004; for captions, consensus reranking as in
Devlin et al. 2015): instead of the beam's most probable caption, pick the candidate with the
highest expected sentence BLEU-4 against the model's own belief about the caption. Two
beliefs are tried:
- the n-best list itself, weighted by softmax(log-prob / T) (each candidate counts itself);
- `--samples` captions drawn from the model (temperature 1), as single references
  (their mean) or as one multi-reference set.
Prints one JSON line per rule (dev BLEU-1..4, mean length, distinct captions) and writes
them all, with the settings, to `--output` (atomically).
"""
from __future__ import annotations

import argparse
import json
import warnings

import torch

from captioner.api import Captioner
from captioner.data.sources import DatasetWarning, read_dataset
from captioner.evaluation import nbest_from_cache
from captioner.metrics import bleu_scores, diversity_scores
from captioner.model.self_critical import sentence_bleu_rewards
from captioner.modelfile import atomic_write_text
from captioner.text import tokenize

NBest = list[tuple[str, float]]


def expected_bleu(candidates: list[list[str]], evidence: list[list[str]], weights: list[float]) -> list[float]:
    """Each candidate's weighted mean sentence BLEU-4 against each evidence caption alone."""
    pairs = [(c, e) for c in candidates for e in evidence]
    scores = sentence_bleu_rewards([c for c, _ in pairs], [[e] for _, e in pairs]).view(len(candidates), len(evidence))
    return (scores * torch.tensor(weights)).sum(1).tolist()


def rerank_by_nbest(nbest: NBest, temperature: float) -> str:
    tokens = [tokenize(c) for c, _ in nbest]
    belief = torch.softmax(torch.tensor([lp for _, lp in nbest]) / temperature, dim=0)
    utility = expected_bleu(tokens, tokens, belief.tolist())
    return nbest[max(range(len(nbest)), key=utility.__getitem__)][0]


def rerank_by_samples(nbest: NBest, samples: list[str], multi_reference: bool) -> str:
    tokens, evidence = [tokenize(c) for c, _ in nbest], [tokenize(s) for s in samples]
    if multi_reference:
        utility = sentence_bleu_rewards(tokens, [evidence] * len(tokens)).squeeze(1).tolist()
    else:
        utility = expected_bleu(tokens, evidence, [1.0 / len(evidence)] * len(evidence))
    return nbest[max(range(len(nbest)), key=utility.__getitem__)][0]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--data-root", default="../shared/datasets/flickr8k")
    parser.add_argument("--features", default="cache/flickr8k-lite0")
    parser.add_argument("--beam", type=int, default=5, help="beam size; its whole n-best list is reranked")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--temperatures", default="0.5,1,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N dev images (a quick check)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", DatasetWarning)
    captioner = Captioner.load(args.model, device="cpu")
    records = [r for r in read_dataset("flickr8k", args.data_root, splits=["dev"]) if r.split == "dev"][:args.limit]
    ids, references = [r.image_id for r in records], [list(r.captions) for r in records]
    nbests = nbest_from_cache(captioner, args.features, ids, 32,
                              dict(beam_size=args.beam, n_best=args.beam, length_penalty=0.0))
    samples = nbest_from_cache(captioner, args.features, ids, 32,
                               dict(sample=True, n_best=args.samples,
                                    generator=torch.Generator().manual_seed(args.seed)))
    samples = [[c for c, _ in s] for s in samples]

    rules = {"beam top-1": [n[0][0] for n in nbests]}
    for t in (float(x) for x in args.temperatures.split(",")):
        rules[f"MBR over the n-best, T={t:g}"] = [rerank_by_nbest(n, t) for n in nbests]
    rules[f"MBR over {args.samples} samples, mean of single references"] = [
        rerank_by_samples(n, s, multi_reference=False) for n, s in zip(nbests, samples)]
    rules[f"MBR over {args.samples} samples, one multi-reference set"] = [
        rerank_by_samples(n, s, multi_reference=True) for n, s in zip(nbests, samples)]

    rows = []
    for rule, hyps in rules.items():
        bleu, diversity = bleu_scores(hyps, references), diversity_scores(hyps)
        rows.append({"rule": rule, **{k: round(v, 4) for k, v in bleu.items()},
                     "mean_length": round(diversity["mean_length"], 2),
                     "distinct_captions": diversity["distinct_captions"]})
        print(json.dumps(rows[-1]), flush=True)
    if args.output:
        atomic_write_text(args.output, json.dumps({"model": captioner.source, "precision": captioner.precision,
                                                   "split": "dev", "beam": args.beam, "samples": args.samples,
                                                   "seed": args.seed, "n_images": len(ids), "rules": rows},
                                                  indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
