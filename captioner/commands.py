"""The library side of `captioner caption | evaluate | export | ensemble`; cli.py only parses.

Each command reports per-file problems as `captioner: error: PATH: reason` and keeps going;
the exit status is 1 if anything failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioner.cli import CaptionerError, error_line


def _load_captioner(model: str | None, device: str, precision: str = "auto"):
    from captioner.api import Captioner
    from captioner.modelfile import ModelFileError
    try:
        return Captioner.load(model, device=device, precision=precision)
    except (ModelFileError, ValueError) as exc:
        raise CaptionerError(str(exc)) from None


def caption(args: argparse.Namespace) -> int:
    from captioner.images import find_images
    images, missing = find_images(args.paths)
    failed = len(missing)
    for given, reason in missing:
        error_line(f"{_shown(given)}: {reason}")
    if not images:
        return 1
    if args.attention_maps is not None:
        try:  # before any work: a bad directory must not surface after the first image
            Path(args.attention_maps).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CaptionerError(f"{args.attention_maps}: cannot create the attention map directory "
                                 f"({exc.strerror or exc})") from None
    captioner = _load_captioner(args.model, args.device, args.precision)
    beam_size, _ = captioner.search_settings(args.beam_size)
    if not args.sample and args.n_best > beam_size:
        raise CaptionerError(f"--n-best {args.n_best} needs --beam-size >= {args.n_best} "
                             f"(the model's beam size is {beam_size})")
    want_maps = args.attention_maps is not None
    if want_maps and not captioner.decoder.config.attention:
        error_line(f"{args.model or 'default model'}: has no attention; --attention-maps ignored")
        want_maps = False
    results = captioner.iter_captions(
        images, beam_size=beam_size, n_best=args.n_best, max_length=args.max_length,
        length_penalty=args.length_penalty, sample=args.sample, temperature=args.temperature,
        top_k=args.top_k, seed=args.seed, batch_size=args.batch_size, return_attention=want_maps)
    _paths_as_bytes(sys.stdout)
    for result in results:
        name = _shown(result.image)
        if not result.ok:
            failed += 1
            error_line(f"{name}: {result.error}")
            continue
        if args.format == "jsonl":
            print(_json_line(result.to_json()), flush=True)
        else:
            print(f"{name}\t{result.caption}", flush=True)
            for alt in result.alternatives[1:]:
                print(f"{name}\t  {alt.caption}\t({alt.log_prob:.3f})", flush=True)
        if want_maps and result.attention:
            try:
                _write_map(args.attention_maps, result, captioner)
            except OSError as exc:  # disk full, directory removed meanwhile: stop, one line
                raise CaptionerError(f"{args.attention_maps}: cannot write the attention map of {name} "
                                     f"({exc.strerror or exc})") from None
    return 1 if failed else 0


def _shown(path) -> str:
    """A path as printed in a one-line-per-image output: line breaks escaped, the rest as is."""
    return str(path).replace("\r", "\\r").replace("\n", "\\n")


def _paths_as_bytes(stream) -> None:
    """Print file names that are not valid UTF-8 (os.fsdecode's lone surrogates) as their
    original bytes, as ls does, instead of failing with UnicodeEncodeError mid-run."""
    if hasattr(stream, "reconfigure") and (stream.errors or "strict") == "strict":
        stream.reconfigure(errors="surrogateescape")


def _json_line(obj: dict) -> str:
    """One JSON object; non-ASCII as is, unless a file name has undecodable bytes: then \\u
    escapes keep the line valid UTF-8 (os.fsencode of the parsed name gives the bytes back)."""
    line = json.dumps(obj, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(obj)
    return line


def _write_map(out_dir: str, result, captioner) -> None:
    from captioner.attention_maps import write_attention_png
    from captioner.images import load_image
    write_attention_png(out_dir, result.image, load_image(result.image), result.words, result.attention,
                        result.grid_shape)


def evaluate(args: argparse.Namespace) -> int:
    from captioner.evaluation import evaluate_model
    from captioner.api import resolve_device
    from captioner.data.features import StaleCacheError
    from captioner.data.sources import DatasetError
    from captioner.model.quantize import resolve_precision
    from captioner.modelfile import ModelFileError
    try:
        resolve_precision(args.precision, resolve_device(args.device))
    except ValueError as exc:
        raise CaptionerError(str(exc)) from None
    try:
        metrics = evaluate_model(
            model=args.model, dataset=args.dataset, data_root=args.data_root, split=args.split,
            beam_size=args.beam_size, length_penalty=args.length_penalty, max_length=args.max_length,
            batch_size=args.batch_size, limit=args.limit, features=args.features, device=args.device,
            precision=args.precision, output=args.output, predictions=args.predictions)
    except (DatasetError, ModelFileError, StaleCacheError) as exc:
        raise CaptionerError(str(exc)) from None
    except KeyError as exc:  # FeatureCache.index_of: an image of the split is not in --features
        if "feature cache" not in str(exc):
            raise
        raise CaptionerError(f"{exc.args[0]}; build the cache for this split with `captioner features`") from None
    print(" ".join(f"{k.upper()} {metrics[k]:.4f}" for k in ("bleu1", "bleu2", "bleu3", "bleu4")) +
          f"  ({metrics['n_images']} images, beam {metrics['beam_size']}; {metrics['distinct_captions']} "
          f"distinct captions, {metrics['distinct_words']} words, {metrics['mean_length']:.1f} words each)")
    return 0


def export(args: argparse.Namespace) -> int:
    from captioner.export import export_checkpoint
    try:
        export_checkpoint(args.checkpoint, args.output, average=args.average)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CaptionerError(f"{args.checkpoint}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    print(f"captioner: wrote {args.output}", file=sys.stderr)
    return 0


def ensemble(args: argparse.Namespace) -> int:
    from captioner.modelfile import ModelFileError, combine_models, load_model, save_model
    try:
        combined = combine_models([load_model(path) for path in args.models], names=list(args.models))
        save_model(args.output, combined)
    except (ModelFileError, OSError) as exc:
        raise CaptionerError(str(exc)) from None
    print(f"captioner: wrote {args.output} ({len(combined.members)} decoders)", file=sys.stderr)
    return 0
