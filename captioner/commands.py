"""One handler per `captioner` subcommand: the only code that prints. The library raises;
`cli.main` turns what escapes into one `captioner: error: ...` line and an exit status.

Per-file problems are reported as `captioner: error: PATH: reason` and the command keeps
going; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

PROG = "captioner"
DECODING_OPTIONS = ("beam_size", "n_best", "max_length", "length_penalty", "sample", "temperature", "top_k",
                    "seed", "precision")


def error_line(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def warning_line(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def decoding_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding options given on the command line (the rest: the model's defaults)."""
    return {name: getattr(args, name) for name in DECODING_OPTIONS if getattr(args, name, None) is not None}


def load_captioner(model: str | None, device: str, overrides: dict[str, Any], encoder_backend: str | None = None):
    """The model, and the decoding this command uses, checked before any work."""
    from captioner.api import Captioner
    captioner = Captioner.load(model, device=device, encoder_backend=encoder_backend)
    config = captioner.settings(**overrides)
    captioner.decoder_for(config.precision)  # an impossible precision fails here
    return captioner, config


# ---- caption -----------------------------------------------------------------------------

def caption(args: argparse.Namespace) -> int:
    """Caption every image found; print `NAME<TAB>caption` (names escaped, `formats.py`) or
    one JSON object per image. With --output (or another option of large runs), the
    resumable bulk form (`bulk_command.py`)."""
    bulk_only = ("output", "devices", "shard", "errors", "num_nodes", "accelerator")
    if any(getattr(args, name, None) is not None for name in bulk_only) or getattr(args, "progress", None):
        from captioner.bulk_command import caption_to_file
        return caption_to_file(args, decoding_overrides(args))
    from captioner.formats import escape_name, json_line
    maps = None
    if args.attention_maps is not None:
        from captioner.attention_maps import AttentionMapWriter
        maps = AttentionMapWriter(args.attention_maps)  # checked before any work
    captioner, config = load_captioner(args.model, args.device, decoding_overrides(args), args.encoder_backend)
    if maps is not None and not captioner.has_attention:
        warning_line(f"{args.model or 'the default model'} has no attention; --attention-maps ignored")
        maps = None
    _paths_as_bytes(sys.stdout)
    problems = [0]
    images = _found_images(args.paths, problems)
    failed = 0
    for result in captioner.iter_captions(images, config, batch_size=args.batch_size,
                                          return_attention=maps is not None, workers=getattr(args, "workers", None)):
        name = escape_name(result.image)
        if not result.ok:
            failed += 1
            error_line(f"{name}: {result.error}")
            continue
        written = maps.write(result) if maps is not None and result.attention else None
        if args.format == "jsonl":
            row = result.to_json()
            if written:
                row["attention_map"] = str(written)
            print(json_line(row), flush=True)
        else:
            print(f"{name}\t{result.caption}", flush=True)
            for alt in result.alternatives[1:]:
                print(f"{name}\t  {alt.caption}\t({alt.log_prob:.3f})", flush=True)
    return 1 if failed or problems[0] else 0


def _found_images(paths: Sequence[str], problems: list[int]):
    """The images of `paths` as they are found (`discovery.iter_images`), each problem
    printed as one line and counted in problems[0]."""
    from captioner.discovery import iter_images
    from captioner.formats import escape_name
    for found in iter_images(paths):
        if found.ok:
            yield found.path
        else:
            problems[0] += 1
            error_line(f"{escape_name(found.path)}: {found.problem}")


def _paths_as_bytes(stream) -> None:
    """Undecodable bytes of names reach the escaper as surrogates; never fail on them."""
    if hasattr(stream, "reconfigure") and (stream.errors or "strict") == "strict":
        stream.reconfigure(errors="surrogateescape")


# ---- evaluate ----------------------------------------------------------------------------

def evaluate(args: argparse.Namespace) -> int:
    from captioner.evaluation import evaluate_model
    from captioner.metrics import BLEU_KEYS
    captioner, config = load_captioner(args.model, args.device, decoding_overrides(args), args.encoder_backend)
    metrics = evaluate_model(captioner, args.dataset, args.data_root, split=args.split, decoding=config,
                             batch_size=args.batch_size, limit=args.limit, features=args.features,
                             output=args.output, predictions=args.predictions)
    shown = [f"{k.upper()} {metrics[k]:.4f}" for k in BLEU_KEYS]
    shown += [f"{label} {metrics[k]:.4f}" for k, label in (("cider_d", "CIDEr-D"), ("rouge_l", "ROUGE-L")) if k in metrics]
    print(" ".join(shown) + f"  ({metrics['n_images']} images, beam {config.beam_size}; "
          f"{metrics['distinct_captions']} distinct captions, {metrics['distinct_words']} words, "
          f"{metrics['mean_length']:.1f} words each)")
    return 0


# ---- features ----------------------------------------------------------------------------

def features(args: argparse.Namespace) -> int:
    from captioner.api import resolve_device
    from captioner.data.extract import build_dataset_cache
    device = resolve_device(args.device)
    report = build_dataset_cache(args.dataset, args.data_root, args.out, encoder=args.encoder, splits=args.splits,
                                 batch_size=args.batch_size, workers=args.workers, device=device,
                                 skip_missing=args.skip_missing)
    n, length, dim = report.cache.index["grid_shape"]
    rate = report.encoded / report.seconds if report.encoded and report.seconds > 0 else 0.0
    repaired = f", {report.repaired} damaged rows repaired" if report.repaired else ""
    print(f"features: {report.encoded} images encoded in {report.seconds:.1f} s ({rate:.1f} images/s){repaired}; "
          f"{args.out}: {n} images x {length} x {dim} ({report.cache.encoder})")
    return 0


# ---- export, ensemble, info --------------------------------------------------------------

def export(args: argparse.Namespace) -> int:
    from captioner.export import export_checkpoint
    export_checkpoint(args.checkpoint, args.output, name=args.name)
    print(f"{PROG}: wrote {args.output}", file=sys.stderr)
    return 0


def ensemble(args: argparse.Namespace) -> int:
    from captioner.modelfile import combine_models, load_model, save_model
    from captioner.outputs import check_output
    check_output(args.output, "ensemble model file", inputs=args.models)
    combined = combine_models([load_model(path) for path in args.models], names=list(args.models))
    combined.name = args.name or ""
    save_model(args.output, combined)
    print(f"{PROG}: wrote {args.output} ({len(combined.members)} decoders)", file=sys.stderr)
    return 0


def average(args: argparse.Namespace) -> int:
    from captioner.errors import UsageError
    from captioner.modelfile import average_models, load_model, save_model
    from captioner.outputs import check_output
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise UsageError(f"--weights must be a comma list of numbers, got {args.weights!r}") from None
    check_output(args.output, "averaged model file", inputs=args.models)
    averaged = average_models([load_model(path) for path in args.models], weights, names=list(args.models))
    averaged.name = args.name or ""
    save_model(args.output, averaged)
    print(f"{PROG}: wrote {args.output} (weights {', '.join(f'{w:.3f}' for w in averaged.training['weights'])})",
          file=sys.stderr)
    return 0


def info(args: argparse.Namespace) -> int:
    from captioner.api import model_path, shipped_models
    from captioner.formats import json_line
    from captioner.modelfile import load_model
    if args.list:
        for name, path in shipped_models().items():
            model = load_model(path)
            print(f"{name}\t{model.name or '(unnamed)'}\t{model.version or ''}")
        return 0
    path = str(model_path(args.model))
    model = load_model(path)
    summary = {"model": path, "name": model.name, "version": model.version, "encoder": model.encoder["name"],
               "decoders": [c.to_dict() for c, _ in model.members], "vocabulary": len(model.vocabulary),
               "decoding": model.decoding.to_dict(), "scores": model.scores}
    if args.json:
        print(json_line(summary))
        return 0
    for line in info_lines(summary):
        print(line)
    return 0


def info_lines(summary: dict[str, Any]) -> list[str]:
    """`captioner info` as text: what the model is, how it decodes, how it scores."""
    decoders = summary["decoders"]
    cells = ", ".join(f"{d['cell']}{'+attention' if d['attention'] else ''} {d['hidden_dim']}" for d in decoders)
    d = summary["decoding"]
    mode = "sampling" if d["sample"] else f"beam {d['beam_size']}"
    lines = [f"model     {summary['model']}",
             f"name      {summary['name'] or '(unnamed)'}",
             f"release   {summary['version'] or '(unknown)'}",
             f"encoder   {summary['encoder']}",
             f"decoders  {len(decoders)}: {cells}; vocabulary {summary['vocabulary']} words",
             f"decoding  {mode}, length penalty {d['length_penalty']:g}, max length {d['max_length']}, "
             f"precision {d['precision']}"]
    for split, table in sorted((summary["scores"] or {}).items()):
        if isinstance(table, dict):
            for setting, values in sorted(table.items()):
                if isinstance(values, dict):
                    shown = " ".join(f"{k} {v:.4f}" for k, v in values.items()
                                     if isinstance(v, float) and not k.startswith(("seconds", "mean")))
                    lines.append(f"{split:<9} {setting:<7} {shown}")
    return lines


# ---- train, recipe -----------------------------------------------------------------------

def train(argv: Sequence[str]) -> int:
    from captioner.train import run_training
    return run_training(argv)


def recipe(args: argparse.Namespace) -> int:
    from captioner.recipe import RecipeSettings, run_recipe
    settings = RecipeSettings(data_root=args.data_root, workdir=args.workdir, cache=args.cache, output=args.output,
                              limit=args.limit, max_epochs=args.max_epochs, precision=args.precision)
    run_recipe(settings, say=lambda line: print(line, flush=True))
    return 0
