"""Command line: argument parsing only; every subcommand calls into the library.

Heavy imports (torch, Lightning) happen inside the subcommand that needs them, so
`captioner caption` never imports Lightning and `captioner --help` is instant.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

PROG = "captioner"


class CaptionerError(Exception):
    """A user-facing failure: printed as one `captioner: error: ...` line, no traceback."""


def error_line(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


# argparse names the type function in its message ("invalid _positive_int value"); name
# them as a user would read them.
_positive_int.__name__ = "positive integer"
_non_negative_int.__name__ = "non-negative integer"
_positive_float.__name__ = "positive number"
_finite_float.__name__ = "number"


def _dataset_name(text: str) -> str:
    from captioner.data.sources import DATASETS  # standard library only: cheap
    if text.lower() not in DATASETS:
        raise argparse.ArgumentTypeError(f"unknown dataset {text!r} (choose from {', '.join(DATASETS)})")
    return text.lower()


def _split_name(text: str) -> str:
    from captioner.data.sources import SPLITS, _parse_splits
    try:
        return _parse_splits([text.strip()])[0]
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown split {text!r} (choose from {', '.join(SPLITS)})") from None


def _split_list(text: str) -> str:
    for part in text.split(","):
        if part.strip():
            _split_name(part)
    return text


_dataset_name.__name__ = "dataset"
_split_name.__name__ = "split"
_split_list.__name__ = "splits"


def _add_precision(p: argparse.ArgumentParser) -> None:
    # The choices of captioner.model.quantize.PRECISIONS, spelled out: parsing imports no torch.
    p.add_argument("--precision", choices=("auto", "float32", "int8"), default="auto",
                   help="decoder arithmetic; auto: int8 on a CPU with int8 kernels, else float32")


def _add_caption(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption image files, directories or globs")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, directories or globs")
    p.add_argument("--model", default=None, help="model file (.safetensors); default: the shipped model")
    p.add_argument("--beam-size", type=_positive_int, default=None,
                   help="default: the model's dev-tuned beam size (3 if it has none)")
    p.add_argument("--n-best", type=_positive_int, default=1)
    p.add_argument("--max-length", type=_positive_int, default=30)
    p.add_argument("--length-penalty", type=_finite_float, default=None,
                   help="GNMT alpha, 0 = none; default: the model's dev-tuned value (0 if it has none)")
    p.add_argument("--sample", action="store_true", help="sample instead of beam search")
    p.add_argument("--temperature", type=_positive_float, default=1.0)
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="0 = no top-k cut")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--attention-maps", metavar="DIR", default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _add_precision(p)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="BLEU-1..4 of a model on a dataset split")
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", required=True, type=_dataset_name,
                   help="flickr8k | flickr8k-kaggle | karpathy | coco | folder")
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default="test", type=_split_name)
    p.add_argument("--beam-size", type=_positive_int, default=None, help="default: the model's")
    p.add_argument("--length-penalty", type=_finite_float, default=None, help="default: the model's")
    p.add_argument("--max-length", type=_positive_int, default=30)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N images")
    p.add_argument("--features", default=None, help="FeatureCache dir to skip the encoder")
    p.add_argument("--output", default=None, help="metrics JSON")
    p.add_argument("--predictions", default=None, help="predictions JSONL")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _add_precision(p)


def _add_features(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="build a FeatureCache of a frozen encoder")
    p.add_argument("--dataset", required=True, type=_dataset_name,
                   help="flickr8k | flickr8k-kaggle | karpathy | coco | folder")
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--splits", default=None, type=_split_list, help="comma list; default: all")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=_non_negative_int, default=2)
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--mirror", action="store_true",
                   help="encode every image flipped left-right: a second view of each image for "
                        "data.mirror_cache; the cache records the flip in its preprocessing")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="turn a Lightning checkpoint into a model file")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--average", nargs="+", default=[], metavar="CKPT",
                   help="checkpoint averaging: export the mean of CHECKPOINT's weights and these "
                        "checkpoints' (of the same run, e.g. the best and the last epoch)")


def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="combine model files into one ensemble model file")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model files (.safetensors), two or more")
    p.add_argument("--output", "-o", required=True, help="the ensemble model file to write")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="CNN+RNN image captioning")
    from captioner import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_caption(sub)
    sub.add_parser("train", help="train from a YAML config (LightningCLI; see `captioner train --help`)",
                   add_help=False)
    _add_evaluate(sub)
    _add_features(sub)
    _add_export(sub)
    _add_ensemble(sub)
    return parser


def _check_caption_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors exit 2 (argparse's convention), before any model is loaded."""
    if args.command != "caption":
        return
    # Single-option ranges are the argparse types' job; this checks options against each other.
    if not args.sample and args.beam_size is not None and args.n_best > args.beam_size:
        parser.error(f"--n-best {args.n_best} needs --beam-size >= {args.n_best}")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "caption":
        from captioner.commands import caption
        return caption(args)
    if args.command == "evaluate":
        from captioner.commands import evaluate
        return evaluate(args)
    if args.command == "features":
        from captioner.data.features import run_features_command
        return run_features_command(args)
    if args.command == "export":
        from captioner.commands import export
        return export(args)
    if args.command == "ensemble":
        from captioner.commands import ensemble
        return ensemble(args)
    raise AssertionError(args.command)


def _report_dataset_warnings() -> None:
    """Show what a dataset reader dropped on purpose (a counted DatasetWarning) as one
    `captioner: warning: ...` line, not as Python's "file.py:331: DatasetWarning" plus the
    source line that raised it. Other warnings are shown as usual."""
    import warnings
    shown = warnings.showwarning
    if getattr(shown, "_captioner", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__name__ == "DatasetWarning":
            print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show._captioner = True
    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _report_dataset_warnings()
    if argv and argv[0] == "train":
        # LightningCLI owns the whole argument surface of `train`.
        from captioner.train import run_training
        return run_training(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _check_caption_args(parser, args)
    try:
        return _dispatch(args)
    except CaptionerError as exc:
        error_line(str(exc))
        return 1
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`captioner caption *.jpg | head -1`): stop quietly. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        _silence_stdout()
        return 1


def _silence_stdout() -> None:
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (embedded, tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
