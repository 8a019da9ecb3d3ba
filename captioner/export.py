"""Lightning checkpoint -> model file. Checkpoints are read with torch's weights-only
unpickler, so a tampered `.ckpt` cannot run code while being exported."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from captioner.modelfile import save_model


def load_module(checkpoint: str | Path):
    """The CaptioningModule of a training checkpoint (restricted unpickler, CPU)."""
    from captioner.model.module import CaptioningModule
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError("no such checkpoint file")
    return CaptioningModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)


def export_checkpoint(checkpoint: str | Path, output: str | Path, training: dict[str, Any] | None = None,
                      scores: dict[str, Any] | None = None) -> None:
    module = load_module(checkpoint)
    if module.vocabulary is None:
        raise ValueError("checkpoint has no vocabulary (not written by captioner train?)")
    save_model(output, module.to_model_file({"checkpoint": str(checkpoint), **(training or {})}, scores))
