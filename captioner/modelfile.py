"""The single-file model format: one `.safetensors` file, no pickle anywhere.

Tensors: `decoder.*` (always) and `encoder.*` (only when the encoder was fine-tuned; a frozen
encoder is rebuilt from its registry weights). Metadata (all JSON strings): `format`,
`format_version`, `encoder` (name, preprocessing, fine-tuned flag), `decoder` (DecoderConfig),
`vocabulary`, `training` (config, data, time), `scores`, and optionally `decoding`: the
search settings chosen on dev (`beam_size`, `length_penalty`) that captioning uses unless the
caller says otherwise.

Format version 2 adds ensembles: `ensemble` metadata (a list of the further members'
DecoderConfigs) and their tensors `ensemble.<i>.*`; `decoder` stays the first member. A
single-decoder file is still written as version 1, so older readers keep reading it.

Writing goes to a temporary file in the same directory and is renamed into place, so a
crash never leaves a half-written model behind.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from captioner.model.decoder import CaptionDecoder, DecoderConfig
from captioner.model.ensemble import EnsembleDecoder
from captioner.text import Vocabulary

FORMAT = "captioner-model"
FORMAT_VERSION = 2          # the newest this code writes (only for ensembles) and reads
READABLE_VERSIONS = ("1", "2")


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
    # Further decoders of an ensemble (config, weights); empty for a single decoder.
    ensemble: list[tuple[DecoderConfig, dict[str, torch.Tensor]]] = field(default_factory=list)
    # Search settings tuned on dev ({"beam_size": int, "length_penalty": float}); {} = none.
    decoding: dict[str, Any] = field(default_factory=dict)

    @property
    def members(self) -> list[tuple[DecoderConfig, dict[str, torch.Tensor]]]:
        """Every decoder: the first (decoder_config/decoder_state), then the ensemble's others."""
        return [(self.decoder_config, self.decoder_state), *self.ensemble]

    def build_decoder(self) -> CaptionDecoder | EnsembleDecoder:
        decoders = []
        for config, state in self.members:
            decoder = CaptionDecoder(config)
            decoder.load_state_dict(state)
            decoders.append(decoder)
        return (decoders[0] if len(decoders) == 1 else EnsembleDecoder(decoders)).eval()


def combine_models(models: list[ModelFile], scores: dict[str, Any] | None = None,
                   names: list[str] | None = None) -> ModelFile:
    """One ensemble model from several model files (ensembles among them are flattened).

    They must agree on everything but the decoders: encoder name, preprocessing and frozen
    weights (fine-tuned encoders differ per model and cannot be shared), and the vocabulary,
    word for word (the members' distributions are averaged per word id). `names` (e.g. the
    file paths) are used in error messages.
    """
    if len(models) < 2:
        raise ModelFileError("an ensemble needs at least two model files")
    names = names or [f"model {i + 1}" for i in range(len(models))]
    first = models[0]
    for name, other in zip(names, models):
        if other.encoder_state is not None:
            raise ModelFileError(f"{name}: its encoder was fine-tuned; ensemble members must share the "
                                 "frozen encoder")
    for name, other in zip(names[1:], models[1:]):
        if other.encoder != first.encoder:
            raise ModelFileError(f"{name}: encoder {other.encoder['name']} or its preprocessing differs "
                                 f"from {names[0]}'s ({first.encoder['name']})")
        if other.vocabulary.words != first.vocabulary.words:
            raise ModelFileError(f"{name}: its vocabulary differs from {names[0]}'s (train the members on "
                                 "the same data with the same min_word_freq)")
    members = [member for model in models for member in model.members]
    training = {"ensemble_of": [model.training for model in models]}
    return ModelFile(members[0][1], members[0][0], first.vocabulary, first.encoder, None, training,
                     scores or {}, ensemble=members[1:])


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
    for i, (_, state) in enumerate(model.ensemble):
        tensors.update({f"ensemble.{i}.{k}": v.detach().cpu().contiguous() for k, v in state.items()})
    metadata = {
        "format": FORMAT,
        "format_version": "2" if model.ensemble else "1",
        "encoder": json.dumps(model.encoder),
        "decoder": json.dumps(model.decoder_config.to_dict()),
        "vocabulary": model.vocabulary.to_json(),
        "training": json.dumps(model.training),
        "scores": json.dumps(model.scores),
    }
    if model.ensemble:
        metadata["ensemble"] = json.dumps([config.to_dict() for config, _ in model.ensemble])
    if model.decoding:
        metadata["decoding"] = json.dumps(model.decoding)
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
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ModelFileError(f"{path}: model format version {meta.get('format_version')!r} is not supported "
                             f"(this captioner reads versions {', '.join(READABLE_VERSIONS)})")
    try:
        config = DecoderConfig(**json.loads(meta["decoder"]))
        ensemble_configs = [DecoderConfig(**c) for c in json.loads(meta.get("ensemble", "[]"))]
        vocab = Vocabulary.from_json(meta["vocabulary"])
        encoder = json.loads(meta["encoder"])
        training = json.loads(meta.get("training", "{}"))
        scores = json.loads(meta.get("scores", "{}"))
        decoding = _decoding(json.loads(meta.get("decoding", "{}")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: damaged metadata ({_first_line(exc)})") from None
    decoder_state = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    encoder_state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")} or None
    if meta.get("format_version") == "1" and ensemble_configs:
        raise ModelFileError(f"{path}: damaged metadata (an ensemble in a version 1 file)")
    ensemble = [(c, {k[len(f"ensemble.{i}."):]: v for k, v in tensors.items() if k.startswith(f"ensemble.{i}.")})
                for i, c in enumerate(ensemble_configs)]
    model = ModelFile(decoder_state, config, vocab, encoder, encoder_state, training, scores, ensemble, decoding)
    for i, (member_config, member_state) in enumerate(model.members):
        name = "decoder" if i == 0 else f"ensemble member {i}"
        if len(vocab) != member_config.vocab_size:
            raise ModelFileError(f"{path}: vocabulary has {len(vocab)} words but the {name} expects "
                                 f"{member_config.vocab_size}")
        _check_decoder_weights(path, name, member_config, member_state)
    if ensemble and any(c.feature_dim != config.feature_dim for c in ensemble_configs):
        raise ModelFileError(f"{path}: ensemble members expect different feature dimensions")
    known = {f"decoder.{k}" for k in decoder_state} | {f"encoder.{k}" for k in encoder_state or {}}
    known |= {f"ensemble.{i}.{k}" for i, (_, state) in enumerate(ensemble) for k in state}
    stray = sorted(set(tensors) - known)
    if stray:
        raise ModelFileError(f"{path}: unexpected tensors {stray[:3]}")
    return model


def _decoding(data: Any) -> dict[str, Any]:
    """Validated `decoding` metadata: only known keys, a beam size >= 1, a finite penalty."""
    if not isinstance(data, dict) or set(data) - {"beam_size", "length_penalty"}:
        raise ValueError(f"decoding must be {{beam_size, length_penalty}}, got {data!r}")
    beam, alpha = data.get("beam_size", 1), data.get("length_penalty", 0.0)
    if not isinstance(beam, int) or isinstance(beam, bool) or beam < 1:
        raise ValueError(f"decoding beam_size must be an integer >= 1, got {beam!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"decoding length_penalty must be a finite number, got {alpha!r}")
    return data


def _check_decoder_weights(path: Path, name: str, config: DecoderConfig, state: dict[str, torch.Tensor]) -> None:
    expected = CaptionDecoder(config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{path}: {name} weights do not match its config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelFileError(f"{path}: weight {key} has shape {tuple(state[key].shape)}, "
                                 f"config implies {tuple(tensor.shape)}")
        if not torch.isfinite(state[key]).all():
            raise ModelFileError(f"{path}: weight {key} contains NaN or infinity")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
