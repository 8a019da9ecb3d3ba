"""`captioner export CKPT OUT.safetensors`: a training checkpoint becomes a model file.

Checkpoints are pickles, so they are read only through torch's weights-only unpickler, which
builds tensors and plain data and refuses anything that would import code; a refusal or a
broken file is one `CheckpointError` line, never torch's page of advice to set
`weights_only=False` (never do that here).
"""
from __future__ import annotations

import os
import pickle
import re
import stat
import warnings
from pathlib import Path
from typing import Any

from captioner.errors import CheckpointError, shown_path
from captioner.modelfile import save_model
from captioner.outputs import check_output


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Lightning checkpoint's dict, read with the weights-only unpickler; CheckpointError
    with a one-line reason otherwise."""
    import torch
    path = Path(path)
    shown = shown_path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{shown}: cannot read the checkpoint ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{shown}: not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4 ..." and the like
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL (\S+)", str(exc))
        if match:
            raise CheckpointError(f"{shown}: refused: unpickling it would import {match[1]}, which could run "
                                  "code; nothing in it was run (only tensors and plain data are read)") from None
        raise CheckpointError(f"{shown}: not a checkpoint the weights-only unpickler can read; nothing in it "
                              "was run") from None
    except EOFError:
        raise CheckpointError(f"{shown}: empty or truncated checkpoint file") from None
    except (RuntimeError, ValueError, OSError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:200]
        raise CheckpointError(f"{shown}: not a readable PyTorch checkpoint ({detail})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{shown}: not a Lightning training checkpoint (no state_dict)")
    return checkpoint


def load_module(checkpoint: str | os.PathLike[str]):
    """The CaptioningModule of a training checkpoint (weights-only unpickler, CPU)."""
    from captioner.model.module import CaptioningModule
    read_checkpoint(checkpoint)  # one clear line for anything unreadable, before Lightning reads it
    try:
        return CaptioningModule.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{shown_path(checkpoint)}: not a captioner training checkpoint ({detail})") from None


def export_checkpoint(checkpoint: str | os.PathLike[str], output: str | os.PathLike[str], name: str | None = None,
                      training: dict[str, Any] | None = None, scores: dict[str, Any] | None = None) -> None:
    """Write `checkpoint` as a model file at `output` (never over the checkpoint itself)."""
    check_output(output, "model file", inputs=[checkpoint])
    module = load_module(checkpoint)
    if module.vocabulary is None:
        raise CheckpointError(f"{shown_path(checkpoint)}: has no vocabulary (not written by captioner train?)")
    model = module.to_model_file({"checkpoint": str(checkpoint), **(training or {})}, scores)
    model.name = name or ""
    save_model(output, model)
