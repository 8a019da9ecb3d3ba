"""`captioner evaluate`: caption a dataset split and score it the way the captioning
literature does: corpus BLEU-1..4, plus CIDEr-D and ROUGE-L from the COCO caption toolkit
when the `coco` extra is installed, and how varied the captions are (`diversity_scores`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from captioner.api import Captioner
from captioner.data.sources import read_dataset
from captioner.decoding import DecodingConfig
from captioner.errors import DatasetError, FeatureCacheError, OutputError
from captioner.metrics import available_coco_metrics, corpus_scores, diversity_scores
from captioner.outputs import atomic_write_text, check_output


def evaluate_model(captioner: Captioner, dataset: str, data_root: str | os.PathLike, split: str = "test",
                   decoding: DecodingConfig | None = None, batch_size: int = 32, limit: int | None = None,
                   features: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
                   predictions: str | os.PathLike | None = None) -> dict[str, Any]:
    """Scores of `captioner` on `split` at `decoding` (default: the model's own). Output
    targets are checked before any image is decoded; predictions are written, then metrics,
    each atomically, and a failure of one never loses the other."""
    targets = [(path, what) for path, what in ((predictions, "predictions file"), (output, "metrics file")) if path]
    for path, what in targets:
        check_output(path, what, inputs=[p for p in (features,) if p])
    records = [r for r in read_dataset(dataset, data_root, splits=[split]) if r.split == split][:limit]
    if not records:
        raise DatasetError(f"{data_root}: no images in split {split!r}")
    config = captioner.settings(decoding)
    if features:
        hyps = captions_from_cache(captioner, features, [r.image_id for r in records], batch_size, config)
    else:
        results = captioner.caption([r.path for r in records], config, batch_size=batch_size)
        bad = [r for r in results if not r.ok]
        if bad:
            raise DatasetError(f"{bad[0].image}: {bad[0].error} ({len(bad)} unreadable images in the split)")
        hyps = [r.caption for r in results]
    metrics = scores(hyps, [list(r.captions) for r in records])
    metrics.update(n_images=len(records), beam_size=config.beam_size, length_penalty=config.length_penalty,
                   decoding=config.to_dict(), split=split, dataset=dataset, model=captioner.source,
                   model_name=captioner.model.name)
    _write_outputs([(predictions, lambda: "".join(json.dumps({"image": Path(r.path).name, "caption": h}) + "\n"
                                                  for r, h in zip(records, hyps))),
                    (output, lambda: json.dumps(metrics, indent=2) + "\n")])
    return metrics


def scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """BLEU-1..4; CIDEr-D and ROUGE-L when pycocoevalcap is installed; caption diversity."""
    coco = bool(available_coco_metrics())
    metrics: dict[str, Any] = corpus_scores(hypotheses, references, coco=coco, meteor=False)
    metrics.update(diversity_scores(hypotheses))
    return metrics


def captions_from_cache(captioner: Captioner, cache_dir: str | os.PathLike, image_ids: list[str], batch_size: int,
                        decoding: DecodingConfig) -> list[str]:
    """Best captions decoded from a FeatureCache built with the model's encoder (skips the CNN)."""
    from captioner.data.cache import FeatureCache, encoder_fingerprint
    cache = FeatureCache.open(cache_dir)
    if cache.index["encoder_fingerprint"] != encoder_fingerprint(captioner.encoder):
        raise FeatureCacheError(f"{cache_dir}: features of other encoder weights or preprocessing ({cache.encoder}, "
                                f"{cache.preprocessing.to_dict()}) than this model's ({captioner.model.encoder['name']}, "
                                f"{captioner.preprocessing.to_dict()}); build a cache for it with `captioner features`")
    missing = [i for i in image_ids if i not in cache]
    if missing:
        raise FeatureCacheError(f"{cache_dir}: {len(missing)} images of the split are not in the feature cache "
                                f"(e.g. {missing[0]}); build it for this split with `captioner features`")
    rows = [cache.index_of(i) for i in image_ids]
    hyps: list[str] = []
    for start in range(0, len(rows), batch_size):
        feats = cache.get(rows[start:start + batch_size], grid=captioner.has_attention)
        hyps += [r.caption for r in captioner.decode_features(feats, decoding)]
    return hyps


def _write_outputs(outputs: list[tuple[str | os.PathLike | None, Any]]) -> None:
    """Write each (path, text maker) that has a path; try all before reporting a failure."""
    failures = []
    for path, make in outputs:
        if not path:
            continue
        try:
            atomic_write_text(path, make())
        except OSError as exc:
            failures.append(f"{path}: {exc.strerror or exc}")
    if failures:
        raise OutputError("could not write " + "; ".join(failures))
