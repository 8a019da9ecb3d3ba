"""`captioner evaluate`: caption a dataset split and score it with corpus BLEU-1..4, and say
how varied its captions are (`diversity_scores`)."""
from __future__ import annotations

import json
from pathlib import Path

from captioner.api import Captioner
from captioner.data.sources import DatasetError, read_dataset
from captioner.metrics import bleu_scores, diversity_scores
from captioner.modelfile import atomic_write_text


def evaluate_model(model: str | None, dataset: str, data_root: str, split: str = "test", beam_size: int | None = None,
                   length_penalty: float | None = None, max_length: int = 30, batch_size: int = 32,
                   limit: int | None = None, features: str | None = None, device: str = "auto",
                   precision: str = "auto", output: str | None = None, predictions: str | None = None,
                   captioner: Captioner | None = None) -> dict:
    """BLEU of `model` on `split`; writes metrics / predictions atomically when asked.
    `beam_size` / `length_penalty` None: the model's own search settings."""
    records = [r for r in read_dataset(dataset, data_root, splits=[split]) if r.split == split][:limit]
    if not records:
        raise DatasetError(f"{data_root}: no images in split {split!r}")
    captioner = captioner or Captioner.load(model, device=device, precision=precision)
    beam_size, length_penalty = captioner.search_settings(beam_size, length_penalty)
    search = dict(beam_size=beam_size, length_penalty=length_penalty, max_length=max_length)
    if features:
        hyps = _captions_from_cache(captioner, features, [r.image_id for r in records], batch_size, search)
    else:
        results = captioner.caption([r.path for r in records], batch_size=batch_size, **search)
        bad = [r for r in results if not r.ok]
        if bad:
            raise DatasetError(f"{bad[0].image}: {bad[0].error} ({len(bad)} unreadable images in the split)")
        hyps = [r.caption for r in results]
    metrics = bleu_scores(hyps, [list(r.captions) for r in records])
    metrics.update(diversity_scores(hyps))
    metrics.update(n_images=len(records), beam_size=beam_size, length_penalty=length_penalty,
                   split=split, dataset=dataset, model=captioner.source,
                   precision=captioner.precision)
    if output:
        atomic_write_text(output, json.dumps(metrics, indent=2) + "\n")
    if predictions:
        atomic_write_text(predictions, "".join(json.dumps({"image": Path(r.path).name, "caption": h}) + "\n"
                                               for r, h in zip(records, hyps)))
    return metrics


def _captions_from_cache(captioner: Captioner, cache_dir: str, image_ids: list[str], batch_size: int,
                         search: dict) -> list[str]:
    """Decode from a FeatureCache built with the model's encoder (skips the CNN)."""
    return [best[0][0] for best in nbest_from_cache(captioner, cache_dir, image_ids, batch_size, search)]


def nbest_from_cache(captioner: Captioner, cache_dir: str, image_ids: list[str], batch_size: int,
                     search: dict) -> list[list[tuple[str, float]]]:
    """Per image, the search's (caption, log-probability) list, best first, decoded from a
    FeatureCache built with the model's encoder (skips the CNN). `search`: keyword
    arguments of `Captioner.decode_features` (n_best, sample, generator, ...)."""
    from captioner.data.features import FeatureCache
    cache = FeatureCache.open(cache_dir)
    if cache.encoder != captioner.model.encoder["name"]:
        raise DatasetError(f"{cache_dir}: cache was built with {cache.encoder}, "
                           f"the model uses {captioner.model.encoder['name']}")
    rows = [cache.index_of(i) for i in image_ids]
    need_grid = captioner.decoder.config.attention
    lists = []
    for start in range(0, len(rows), batch_size):
        feats = cache.get(rows[start:start + batch_size], grid=need_grid)
        out = captioner.decode_features(feats.grid, feats.pooled, **search)
        lists += [[(captioner.vocabulary.decode(tokens.tolist()), float(logp))
                   for tokens, logp in zip(image_tokens, image_logp)]
                  for image_tokens, image_logp in zip(out.tokens, out.log_probs)]
    return lists
