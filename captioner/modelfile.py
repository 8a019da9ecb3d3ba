"""The single-file model format: one `.safetensors` file, no pickle anywhere.

Tensors: `decoder.*` (always) and `encoder.*` (only when the encoder was fine-tuned; a frozen
encoder is rebuilt from its registry weights). Metadata (all JSON strings): `format`,
`format_version`, `encoder` (name, preprocessing, fine-tuned flag), `decoder` (DecoderConfig),
`vocabulary`, `training` (config, data, time), `scores`.

Writing goes to a temporary file in the same directory and is renamed into place, so a
crash never leaves a half-written model behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from captioner.model.decoder import CaptionDecoder, DecoderConfig
from captioner.text import Vocabulary

FORMAT = "captioner-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and the problem."""


@dataclass
class ModelFile:
    decoder_state: dict[str, torch.Tensor]
    decoder_config: DecoderConfig
    vocabulary: Vocabulary
    encoder: dict[str, Any]                     # {"name", "preprocessing", "finetuned"}
    encoder_state: dict[str, torch.Tensor] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)

    def build_decoder(self) -> CaptionDecoder:
        decoder = CaptionDecoder(self.decoder_config)
        decoder.load_state_dict(self.decoder_state)
        return decoder.eval()


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make shared models unreadable to others
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_model(path: str | os.PathLike, model: ModelFile) -> None:
    tensors = {f"decoder.{k}": v.detach().cpu().contiguous() for k, v in model.decoder_state.items()}
    if model.encoder_state:
        tensors.update({f"encoder.{k}": v.detach().cpu().contiguous() for k, v in model.encoder_state.items()})
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "encoder": json.dumps(model.encoder),
        "decoder": json.dumps(model.decoder_config.to_dict()),
        "vocabulary": model.vocabulary.to_json(),
        "training": json.dumps(model.training),
        "scores": json.dumps(model.scores),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata() or {}


def load_model(path: str | os.PathLike) -> ModelFile:
    """Read and validate a model file. Never unpickles; refuses anything inconsistent."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, not a model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if path.suffix in (".ckpt", ".pt", ".pth", ".pkl", ".bin"):
        raise ModelFileError(f"{path}: {path.suffix} files may contain pickled code and are not loaded; "
                             "convert a training checkpoint with `captioner export CKPT OUT.safetensors`")
    try:
        meta = _metadata(path)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: not a valid safetensors model file ({_first_line(exc)})") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a captioner model file (format={meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ModelFileError(f"{path}: model format version {meta.get('format_version')!r} is not supported "
                             f"(this captioner reads version {FORMAT_VERSION})")
    try:
        config = DecoderConfig(**json.loads(meta["decoder"]))
        vocab = Vocabulary.from_json(meta["vocabulary"])
        encoder = json.loads(meta["encoder"])
        training = json.loads(meta.get("training", "{}"))
        scores = json.loads(meta.get("scores", "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: damaged metadata ({_first_line(exc)})") from None
    decoder_state = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    encoder_state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")} or None
    if len(vocab) != config.vocab_size:
        raise ModelFileError(f"{path}: vocabulary has {len(vocab)} words but the decoder expects {config.vocab_size}")
    model = ModelFile(decoder_state, config, vocab, encoder, encoder_state, training, scores)
    _check_decoder_weights(path, model)
    return model


def _check_decoder_weights(path: Path, model: ModelFile) -> None:
    expected = CaptionDecoder(model.decoder_config).state_dict()
    missing = sorted(set(expected) - set(model.decoder_state))
    unexpected = sorted(set(model.decoder_state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{path}: decoder weights do not match its config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in expected.items():
        if tuple(model.decoder_state[name].shape) != tuple(tensor.shape):
            raise ModelFileError(f"{path}: weight {name} has shape {tuple(model.decoder_state[name].shape)}, "
                                 f"config implies {tuple(tensor.shape)}")
        if not torch.isfinite(model.decoder_state[name]).all():
            raise ModelFileError(f"{path}: weight {name} contains NaN or infinity")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
