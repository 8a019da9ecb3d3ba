"""Lightning checkpoint -> model file. Checkpoints are read with torch's weights-only
unpickler, so a tampered `.ckpt` cannot run code while being exported."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from captioner.modelfile import save_model


def load_module(checkpoint: str | Path):
    """The CaptioningModule of a training checkpoint (restricted unpickler, CPU)."""
    from captioner.model.module import CaptioningModule
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError("no such checkpoint file")
    _check_checkpoint(path)
    return CaptioningModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)


def _check_checkpoint(path: Path) -> None:
    """Read the file with torch's weights-only unpickler first, so that a refusal or a broken
    file becomes a ValueError with a one-line reason instead of torch's page-long
    UnpicklingError (which also suggests `weights_only=False`: never do that here)."""
    import pickle
    import warnings

    import torch
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4 ..."
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL (\S+)", str(exc))
        if match:
            raise ValueError(f"refused: unpickling it would import {match[1]}, which could run code; "
                             "nothing in it was run (only tensors and plain data are read)") from None
        detail = [line for line in str(exc).splitlines() if line.strip()][-2:-1] or ["unreadable pickle"]
        raise ValueError(f"not a checkpoint that the weights-only unpickler can read ({detail[0].strip()}); "
                         "nothing in it was run") from None
    except EOFError:
        raise ValueError("empty or truncated checkpoint file") from None
    except RuntimeError as exc:
        raise ValueError(f"not a readable PyTorch checkpoint ({str(exc).splitlines()[0].split('. ')[0]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError("not a Lightning training checkpoint (no state_dict)")


def export_checkpoint(checkpoint: str | Path, output: str | Path, training: dict[str, Any] | None = None,
                      scores: dict[str, Any] | None = None) -> None:
    module = load_module(checkpoint)
    if module.vocabulary is None:
        raise ValueError("checkpoint has no vocabulary (not written by captioner train?)")
    save_model(output, module.to_model_file({"checkpoint": str(checkpoint), **(training or {})}, scores))
