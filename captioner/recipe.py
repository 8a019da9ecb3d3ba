"""`captioner recipe flickr8k`: the shipped default model, reproduced by one command.

Stages, each skipped when its output is already there, so a killed run resumes where it
stopped (a training stage interrupted mid-way resumes from its last.ckpt):

  1. features     the frozen EfficientNet-Lite0 features of every image, once (FeatureCache)
  2. xe           the attention GRU-512, cross-entropy (configs/flickr8k-att-gru512.yaml)
  3. scst-cider   self-critical training from 2 on CIDEr-D + BLEU-1 + BLEU-4
  4. scst-bleu    self-critical training from 2 on BLEU-1 + BLEU-4
  5. soup         3 and 4 averaged weight by weight into one decoder (a model soup): the
                  mixing weight with the best dev BLEU-4 at beam 3, from SOUP_WEIGHTS
  6. ensemble     3 and 4 as a pair whose word distributions are averaged at every step:
                  the quality model, shipped by name beside the default
  7. decoding     for each, the beam size with the best dev BLEU-4 (ties go to the cheaper
                  beam): dev chooses, test is never looked at
  8. ship         dev and test scores at every beam, written into each model file with its
                  name, release and default decoding; weights stored as float16

On 2 CPU cores the full recipe takes about 2 h 15 min; `limit` and `max_epochs` make a tiny
run of the same stages (the tests run one).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from captioner.errors import TrainingError
from captioner.metrics import BLEU_KEYS

MODEL_NAME = "flickr8k-att-gru512-scst-soup"     # the default: one decoder
PAIR_NAME = "flickr8k-att-gru512-scst-pair"      # the two decoders as an ensemble
SOUP_WEIGHTS = (0.5, 0.6, 0.7, 0.8)              # the BLEU-1+4 decoder's share, tried on dev
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = {"xe": ["flickr8k-att-gru512.yaml"],
          "scst-cider": ["flickr8k-att-gru512.yaml", "flickr8k-att-gru512-scst-cider.yaml"],
          "scst-bleu": ["flickr8k-att-gru512.yaml", "flickr8k-att-gru512-scst-cider.yaml",
                        "flickr8k-att-gru512-scst-bleu.yaml"]}


@dataclass
class RecipeSettings:
    data_root: str = "../shared/datasets/flickr8k"
    workdir: str = "runs/recipe"
    cache: str = "cache/flickr8k-lite0"
    output: str | None = None               # default: <workdir>/<MODEL_NAME>.safetensors (the pair beside it)
    limit: int | None = None                # train on the first N train images (N // 4 dev and test)
    max_epochs: int | None = None           # every training stage at most this many epochs
    beams: tuple[int, ...] = (1, 3, 5)
    precision: str = "auto"
    extra: list[str] = field(default_factory=list)  # further `captioner train` arguments for every stage

    @property
    def output_path(self) -> Path:
        return Path(self.output) if self.output else Path(self.workdir) / f"{MODEL_NAME}.safetensors"

    @property
    def pair_path(self) -> Path:
        return self.output_path.with_name(f"{PAIR_NAME}.safetensors")


def run_recipe(settings: RecipeSettings, say: Callable[[str], None] = lambda line: None) -> Path:
    """Run (or finish) every stage; returns the default model file (the pair lies beside it)."""
    from captioner.api import Captioner
    from captioner.outputs import check_output
    work, out, pair = Path(settings.workdir), settings.output_path, settings.pair_path
    check_output(out, "model file")
    check_output(pair, "model file")
    if out.is_file() and pair.is_file():
        say(f"recipe: {out} and {pair} exist: nothing to do (delete them to ship again)")
        return out
    started = time.perf_counter()
    _features(settings, say)
    for stage in STAGES:
        _train(stage, settings, work, say)
    for path, name, source in ((out, MODEL_NAME, lambda: _soup(work, settings, say)),
                               (pair, PAIR_NAME, lambda: _ensemble(work, say))):
        if path.is_file():
            say(f"recipe: {path} exists, skipped")
            continue
        # Scored as shipped: the float16 weights the file stores (cast to float32 on load).
        captioner = Captioner.load(_float16(source(), work / f"{name}.float16.safetensors"), device="cpu")
        decoding, scores = _choose_decoding(captioner, settings, say)
        _ship(captioner, name, decoding, scores, settings, path, say)
    say(f"recipe: done in {time.perf_counter() - started:.0f} s: {out}")
    return out


def _features(settings: RecipeSettings, say: Callable[[str], None]) -> None:
    from captioner.data.extract import build_dataset_cache, ensure_cache
    say("recipe: stage features")
    if settings.limit is None:
        report = build_dataset_cache("flickr8k", settings.data_root, settings.cache, progress=False)
        say(f"recipe: features: {report.encoded} encoded, {report.repaired} repaired, {len(report.cache)} in the cache")
        return
    records = _records(settings)
    ensure_cache(settings.cache, "efficientnet-lite0", [r.path for r in records], [r.image_id for r in records],
                 progress=False)


def _records(settings: RecipeSettings) -> list:
    """The images the recipe uses: all of Flickr8k, or the first `limit` train and limit // 4
    dev and test images."""
    from captioner.data.sources import read_dataset
    records = read_dataset("flickr8k", settings.data_root, splits=["train", "dev", "test"])
    if settings.limit is None:
        return records
    quota = {"train": settings.limit, "dev": max(1, settings.limit // 4), "test": max(1, settings.limit // 4)}
    picked = []
    for record in records:
        if quota[record.split] > 0:
            quota[record.split] -= 1
            picked.append(record)
    return picked


def _train(stage: str, settings: RecipeSettings, work: Path, say: Callable[[str], None]) -> Path:
    from captioner.train import run_training
    run_dir = work / stage
    model = run_dir / "model.safetensors"
    if model.is_file():
        say(f"recipe: stage {stage}: {model} exists, skipped")
        return model
    args = ["fit", "--config", str(CONFIGS / "base.yaml")]
    for config in STAGES[stage]:
        args += ["--config", str(CONFIGS / config)]
    args += ["--trainer.default_root_dir", str(run_dir), "--data.data_root", settings.data_root,
             "--data.feature_cache", settings.cache]
    if stage != "xe":
        args += ["--model.init_decoder", str(work / "xe" / "model.safetensors")]
    if settings.limit is not None:
        args += ["--data.train_limit", str(settings.limit), "--data.val_limit", str(max(1, settings.limit // 4))]
    if settings.max_epochs is not None:
        args += ["--trainer.max_epochs", str(settings.max_epochs)]
    resume = _last_checkpoint(run_dir)
    if resume is not None:
        args += ["--ckpt_path", str(resume)]
    say(f"recipe: stage {stage}" + (f" (resuming {resume})" if resume else ""))
    run_training([*args, *settings.extra])
    if not model.is_file():
        raise TrainingError(f"recipe: stage {stage} ended without writing {model}")
    return model


def _last_checkpoint(run_dir: Path) -> Path | None:
    """The newest last.ckpt of an interrupted run of this stage, if any."""
    found = sorted(run_dir.glob("lightning_logs/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _soup(work: Path, settings: RecipeSettings, say: Callable[[str], None]) -> Path:
    """The two self-critical decoders averaged weight by weight, the mix chosen on dev."""
    from captioner.api import Captioner
    from captioner.modelfile import average_models, load_model, save_model
    cider, bleu = (load_model(work / stage / "model.safetensors") for stage in ("scst-cider", "scst-bleu"))
    dev = {}
    for weight in SOUP_WEIGHTS:
        path = work / f"soup-{weight}.safetensors"
        save_model(path, average_models([cider, bleu], [1.0 - weight, weight]))
        dev[weight] = _evaluate(Captioner.load(path, device="cpu"), "dev", 3, settings)["bleu4"]
    best = max(SOUP_WEIGHTS, key=lambda w: dev[w])
    say("recipe: stage soup: dev BLEU-4 at beam 3 " + ", ".join(f"{w} {dev[w]:.4f}" for w in SOUP_WEIGHTS)
        + f": the BLEU-1+4 decoder's weight {best}")
    return work / f"soup-{best}.safetensors"


def _float16(source: Path, out: Path) -> Path:
    """`source` with its weights stored as float16 (half the file; scores measured on it)."""
    import torch

    from captioner.modelfile import load_model, save_model
    save_model(out, load_model(source), dtype=torch.float16)
    return out


def _ensemble(work: Path, say: Callable[[str], None]) -> Path:
    from captioner.modelfile import combine_models, load_model, save_model
    out = work / "ensemble.safetensors"
    members = [work / stage / "model.safetensors" for stage in ("scst-cider", "scst-bleu")]
    save_model(out, combine_models([load_model(m) for m in members], names=[str(m) for m in members]))
    say(f"recipe: stage ensemble: {out}")
    return out


def _evaluate(captioner, split: str, beam: int, settings: RecipeSettings) -> dict:
    from captioner.evaluation import evaluate_model
    records = [r for r in _records(settings) if r.split == split]
    decoding = captioner.settings(beam_size=beam, length_penalty=0.0, precision=settings.precision)
    start = time.perf_counter()
    metrics = evaluate_model(captioner, "flickr8k", settings.data_root, split=split, decoding=decoding,
                             limit=len(records), features=settings.cache)
    kept = {k: round(float(metrics[k]), 4) for k in (*BLEU_KEYS, "cider_d", "rouge_l") if k in metrics}
    kept.update(distinct_captions=metrics["distinct_captions"], distinct_words=metrics["distinct_words"],
                seconds=round(time.perf_counter() - start, 1))
    return kept


def _choose_decoding(captioner, settings: RecipeSettings, say: Callable[[str], None]) -> tuple[int, dict]:
    """The beam with the best dev BLEU-4 (to 4 decimals); a tie goes to the smaller beam."""
    dev = {f"beam{b}": _evaluate(captioner, "dev", b, settings) for b in settings.beams}
    best = max(settings.beams, key=lambda b: (dev[f"beam{b}"]["bleu4"], -b))
    say("recipe: stage decoding: dev BLEU-4 " + ", ".join(f"beam {b} {dev[f'beam{b}']['bleu4']:.4f}"
                                                          for b in settings.beams) + f": beam {best}")
    return best, {"dev": dev}


def _ship(captioner, name: str, beam: int, scores: dict, settings: RecipeSettings, out: Path,
          say: Callable[[str], None]) -> None:
    import torch

    from captioner.modelfile import save_model
    from captioner.version import __version__
    scores["test"] = {f"beam{b}": _evaluate(captioner, "test", b, settings) for b in settings.beams}
    from captioner.model.inference import resolve_precision
    scores.update(length_penalty=0.0, precision=resolve_precision(settings.precision, captioner.device))
    model = captioner.model
    model.scores, model.name, model.version = scores, name, __version__
    model.decoding = model.decoding.replace(beam_size=beam, length_penalty=0.0, precision=settings.precision)
    save_model(out, model, dtype=torch.float16)
    test = scores["test"][f"beam{beam}"]
    say(f"recipe: stage ship: test at beam {beam}: " + " / ".join(f"{test[k]:.3f}" for k in BLEU_KEYS)
        + (f", CIDEr-D {test['cider_d']:.3f}" if "cider_d" in test else "") + f" -> {out}")

