"""Command line: argument parsing, error printing and exit codes; `commands.py` does the work.

Heavy imports (torch, Lightning) happen inside the subcommand that needs them, so `captioner
caption` never imports Lightning and `captioner --help` is instant. Every numeric option is
bounded at parse time (the decoding bounds come from `captioner.decoding.LIMITS`), so a bad
value is a usage error (exit 2) before any model loads. Errors are one line on stderr:
`captioner: error: ...`; exit status 1 for a problem with the user's files or data, 2 for a
usage error, 130 after Ctrl+C.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Sequence

from captioner.decoding import LIMITS, PRECISIONS

PROG = "captioner"


# ---- option types ------------------------------------------------------------------------

def bounded_int(low: int, high: int, name: str = "integer") -> Callable[[str], int]:
    def parse(text: str) -> int:
        cleaned = text.strip()
        if not (cleaned.lstrip("-").isascii() and cleaned.lstrip("-").isdigit()) or len(cleaned) > 20:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}")
        value = int(cleaned)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text}")
        return value
    parse.__name__ = name
    return parse


def bounded_float(low: float, high: float, name: str = "number") -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be a number from {low:g} to {high:g}, got {text!r}")
        return value
    parse.__name__ = name
    return parse


def _decoding_type(field: str) -> Callable[[str], float]:
    low, high = LIMITS[field]
    if isinstance(low, int) and isinstance(high, int):
        return bounded_int(low, high, field.replace("_", " "))
    return bounded_float(low, high, field.replace("_", " "))


def _dataset_name(text: str) -> str:
    from captioner.data.sources import DATASETS  # standard library only: cheap
    if text.lower() not in DATASETS:
        raise argparse.ArgumentTypeError(f"unknown dataset {text!r} (choose from {', '.join(DATASETS)})")
    return text.lower()


def _split_name(text: str) -> str:
    from captioner.data.sources import SPLITS, parse_split
    try:
        return parse_split(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown split {text!r} (choose from {', '.join(SPLITS)})") from None


def _split_list(text: str) -> list[str]:
    return [_split_name(part) for part in text.split(",") if part.strip()]


_dataset_name.__name__, _split_name.__name__, _split_list.__name__ = "dataset", "split", "splits"
DEVICES = ("auto", "cpu", "cuda")
ENCODER_BACKENDS = ("auto", "onnxruntime", "eager")  # model/fast_encoder.BACKENDS, without importing torch


# ---- subcommands -------------------------------------------------------------------------

def _add_decoding(p: argparse.ArgumentParser, sampling: bool = True) -> None:
    """The DecodingConfig options; left out, each takes the model's own default."""
    g = p.add_argument_group("decoding (default: the model's own, see `captioner info`)")
    g.add_argument("--beam-size", type=_decoding_type("beam_size"))
    g.add_argument("--n-best", type=_decoding_type("n_best"), help="captions per image, best first")
    g.add_argument("--max-length", type=_decoding_type("max_length"))
    g.add_argument("--length-penalty", type=_decoding_type("length_penalty"), help="GNMT alpha; 0 = none")
    if sampling:
        g.add_argument("--sample", action="store_true", default=None, help="sample instead of beam search")
        g.add_argument("--temperature", type=_decoding_type("temperature"))
        g.add_argument("--top-k", type=_decoding_type("top_k"), help="0 = no top-k cut")
        g.add_argument("--seed", type=_decoding_type("seed"))
    g.add_argument("--precision", choices=PRECISIONS,
                   help="decoder arithmetic; auto: int8 on a CPU with x86 int8 kernels, else float32")


def _add_encoder_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder-backend", choices=ENCODER_BACKENDS, default=None,
                   help="auto: ONNX Runtime on the CPU where the onnx extra is installed, else eager "
                        "(default: $CAPTIONER_ENCODER_BACKEND, else auto)")


def _add_caption(sub: argparse._SubParsersAction) -> None:
    def shard(text: str) -> tuple[int, int]:
        index, slash, count = text.strip().partition("/")
        if not (slash and index.isascii() and index.isdigit() and count.isascii() and count.isdigit()
                and len(index) < 10 and len(count) < 10 and int(index) < int(count)):
            raise argparse.ArgumentTypeError(f"must be I/N with integers 0 <= I < N (e.g. 0/4), got {text!r}")
        return int(index), int(count)

    p = sub.add_parser("caption", help="caption image files, directories or globs")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, directories or globs")
    p.add_argument("--model", help="model file (.safetensors) or shipped model name; default: the default model")
    _add_decoding(p)
    p.add_argument("--batch-size", type=bounded_int(1, 1024), default=16)
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--attention-maps", metavar="DIR")
    p.add_argument("--device", choices=DEVICES, default="auto")
    _add_encoder_backend(p)
    p.add_argument("--workers", type=bounded_int(1, 64, "workers"),
                   help="threads decoding images one batch ahead of the network (default: up to 4)")
    g = p.add_argument_group("large collections (docs/scaling.md)")
    g.add_argument("--output", "-o", metavar="FILE",
                   help="append one record per image to FILE (.jsonl or .csv) as it goes; a rerun resumes")
    g.add_argument("--errors", metavar="FILE", help="also write each failed image as a JSON line to FILE")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    g.add_argument("--shard", type=shard, metavar="I/N",
                   help="only shard I of N (0-based), picked by a stable hash of each path")
    g.add_argument("--devices", type=bounded_int(1, 1024, "devices"),
                   help="run N processes through Lightning (DDP): GPUs, or CPU processes")
    g.add_argument("--num-nodes", type=bounded_int(1, 10_000, "nodes"), help="machines, with --devices")
    g.add_argument("--accelerator", choices=("cpu", "gpu", "auto"),
                   help="with --devices; default: from --device")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="BLEU-1..4 (and CIDEr-D, ROUGE-L) of a model on a dataset split")
    p.add_argument("--model", help="model file or shipped model name; default: the default model")
    p.add_argument("--dataset", required=True, type=_dataset_name, help="flickr8k | flickr8k-kaggle | karpathy | coco | folder")
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default="test", type=_split_name)
    _add_decoding(p, sampling=False)
    p.add_argument("--batch-size", type=bounded_int(1, 1024), default=32)
    p.add_argument("--limit", type=bounded_int(1, 10**9), help="only the first N images")
    p.add_argument("--features", help="a FeatureCache directory: skip the encoder")
    p.add_argument("--output", help="metrics JSON")
    p.add_argument("--predictions", help="predictions JSONL")
    p.add_argument("--device", choices=DEVICES, default="auto")
    _add_encoder_backend(p)


def _add_features(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="build (or resume, or repair) a FeatureCache of a frozen encoder")
    p.add_argument("--dataset", required=True, type=_dataset_name, help="flickr8k | flickr8k-kaggle | karpathy | coco | folder")
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--splits", type=_split_list, help="comma list; default: all")
    p.add_argument("--batch-size", type=bounded_int(1, 4096), default=64)
    p.add_argument("--workers", type=bounded_int(0, 64), default=2)
    p.add_argument("--skip-missing", action="store_true", help="drop listed images whose file is missing")
    p.add_argument("--device", choices=DEVICES, default="auto")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="turn a Lightning training checkpoint into a model file")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--name", help="the model's name, recorded in the file")


def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="combine model files into one ensemble model file")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model files (.safetensors), two or more")
    p.add_argument("--output", "-o", required=True, help="the ensemble model file to write")
    p.add_argument("--name", help="the ensemble's name, recorded in the file")


def _add_average(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("average", help="average decoders' weights into one decoder (a model soup)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="single-decoder model files of one architecture")
    p.add_argument("--weights", help="comma list, one per model (default: equal); normalised to sum 1")
    p.add_argument("--output", "-o", required=True, help="the averaged model file to write")
    p.add_argument("--name", help="its name, recorded in the file")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="name, release, scores and default decoding of a model file")
    p.add_argument("model", nargs="?", help="model file or shipped model name; default: the default model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--list", action="store_true", help="list the models shipped in the package")


def _add_recipe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="reproduce the default model end to end (resumable)")
    p.add_argument("name", choices=("flickr8k",), help="the recipe: flickr8k (the shipped default model)")
    p.add_argument("--data-root", default="../shared/datasets/flickr8k")
    p.add_argument("--workdir", default="runs/recipe", help="runs of every stage; a rerun skips finished stages")
    p.add_argument("--cache", default="cache/flickr8k-lite0", help="the feature cache")
    p.add_argument("--output", help="the final model file; default: WORKDIR/flickr8k-att-gru512-scst-pair.safetensors")
    p.add_argument("--limit", type=bounded_int(4, 10**7), help="a small run: the first N train images (N/4 dev, test)")
    p.add_argument("--max-epochs", type=bounded_int(1, 1000), help="every training stage at most this many epochs")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")


def build_parser() -> argparse.ArgumentParser:
    from captioner.version import __version__
    parser = argparse.ArgumentParser(prog=PROG, description="CNN encoder + RNN decoder image captioning")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_caption(sub)
    sub.add_parser("train", help="train from YAML configs (LightningCLI; `captioner train --help`)", add_help=False)
    _add_recipe(sub)
    _add_evaluate(sub)
    _add_features(sub)
    _add_export(sub)
    _add_ensemble(sub)
    _add_average(sub)
    _add_info(sub)
    return parser


# ---- running -----------------------------------------------------------------------------

def _report_dataset_warnings() -> None:
    """Show the package's own warnings (a dataset reader's, the encoder backend's) as one
    `captioner: warning: ...` line instead of Python's "file.py:331: DatasetWarning" and the
    source line; other warnings as usual."""
    import warnings
    shown = warnings.showwarning
    if getattr(shown, "_captioner", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__name__ in ("DatasetWarning", "EncoderBackendWarning"):
            print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show._captioner = True
    warnings.showwarning = show


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "train":
        # LightningCLI owns the whole argument surface of `train`.
        from captioner import commands
        return commands.train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from captioner import commands
    return getattr(commands, args.command)(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The `captioner` entry point: the only place that turns errors into lines and statuses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _report_dataset_warnings()
    from captioner.allocator import keep_freed_memory
    from captioner.commands import error_line
    from captioner.errors import CaptionerError, UsageError
    keep_freed_memory()  # a process-wide choice, made by the entry point (captioner/allocator.py)
    try:
        return _run(argv)
    except UsageError as exc:
        error_line(_one_message(exc))
        return 2
    except CaptionerError as exc:
        error_line(_one_message(exc))
        return 1
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`captioner caption *.jpg | head -1`): stop quietly.
        _silence_stdout()
        return 1
    except OSError as exc:
        if exc.filename is None and _is_stdout_error(exc):
            _silence_stdout()
            error_line(f"stdout: cannot write the results ({exc.strerror or exc})")
            return 1
        raise


def _one_message(exc: BaseException) -> str:
    """The error's own line, also when a DataLoader worker re-raised it with the worker's
    traceback in the message ("Caught X in DataLoader worker process 0. Original Traceback")."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(("captioner.errors.", type(exc).__name__)) else last
    return text


def _is_stdout_error(exc: OSError) -> bool:
    """An OSError from writing stdout (a full disk, a closed descriptor)."""
    import errno
    return exc.errno in (errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT, errno.EFBIG)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (embedded, tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
