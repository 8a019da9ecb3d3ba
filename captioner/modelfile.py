"""The single-file model format: one `.safetensors` file, no pickle anywhere.

Tensors: `decoder.*` (always), `ensemble.<i>.*` (the further decoders of an ensemble) and
`encoder.*` (only when the encoder was fine-tuned; a frozen one is rebuilt from its registry
weights). Floating-point tensors may be stored as float32, float16 or bfloat16; they are
cast to float32 on load. Metadata (JSON strings): `format`, `format_version`, `name` (what
the model is, e.g. `flickr8k-att-gru512-scst-pair`), `captioner_version` (the release that
wrote it), `encoder` (name, preprocessing, fine-tuned flag), `decoder` (DecoderConfig),
`ensemble` (the further members' configs), `vocabulary`, `decoding` (the model's default
`DecodingConfig`, chosen on dev), `training` and `scores`.

Loading validates before it allocates: the metadata against a schema with sane bounds, then
every tensor's name, dtype and shape from the file's header against the shapes the configs
imply (computed on the meta device), and only then reads the tensors and checks them for
NaN and infinity. Any problem is one `ModelFileError` line naming the file.
"""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from captioner.decoding import DecodingConfig
from captioner.errors import CaptionerError, ModelFileError, shown_path
from captioner.model.decoder import CaptionDecoder, DecoderConfig
from captioner.model.ensemble import EnsembleDecoder
from captioner.outputs import atomic_write
from captioner.text import Vocabulary

FORMAT = "captioner-model"
FORMAT_VERSION = "3"
READABLE_VERSIONS = ("1", "2", "3")
# Bounds of a model file's sizes: far above any captioner, far below what would exhaust memory.
MAX_DECODER_SIZES = {"vocab_size": 100_000, "feature_dim": 4096, "embed_dim": 4096, "hidden_dim": 4096,
                     "attention_dim": 4096, "num_layers": 8}
MAX_MEMBERS = 8
MAX_METADATA_CHARS = 16 * 1024 * 1024
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    name: str = ""
    version: str = ""                           # the captioner release that wrote the file

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


def _check_compatible(models: list[ModelFile], names: list[str], what: str) -> None:
    """Models that can be combined: the same frozen encoder (fine-tuned encoders differ per
    model and cannot be shared) and the same vocabulary, word for word."""
    first = models[0]
    for name, other in zip(names, models):
        if other.encoder_state is not None:
            raise ModelFileError(f"{name}: its encoder was fine-tuned; {what} members must share the frozen encoder")
    for name, other in zip(names[1:], models[1:]):
        if other.encoder != first.encoder:
            raise ModelFileError(f"{name}: encoder {other.encoder['name']} or its preprocessing differs "
                                 f"from {names[0]}'s ({first.encoder['name']})")
        if other.vocabulary.words != first.vocabulary.words:
            raise ModelFileError(f"{name}: its vocabulary differs from {names[0]}'s (train the members on "
                                 "the same data with the same min_word_freq)")


def combine_models(models: list[ModelFile], scores: dict[str, Any] | None = None,
                   names: list[str] | None = None) -> ModelFile:
    """One ensemble model from several model files (ensembles among them are flattened): at
    every step the members' word distributions are averaged. `names` (e.g. the file paths)
    are used in error messages."""
    if len(models) < 2:
        raise ModelFileError("an ensemble needs at least two model files")
    names = names or [f"model {i + 1}" for i in range(len(models))]
    _check_compatible(models, names, "ensemble")
    members = [member for model in models for member in model.members]
    if len(members) > MAX_MEMBERS:
        raise ModelFileError(f"an ensemble may have at most {MAX_MEMBERS} decoders, got {len(members)}")
    training = {"ensemble_of": [model.training for model in models]}
    return ModelFile(members[0][1], members[0][0], models[0].vocabulary, models[0].encoder, None, training,
                     scores or {}, ensemble=members[1:], decoding=models[0].decoding)


def average_models(models: list[ModelFile], weights: list[float] | None = None,
                   names: list[str] | None = None) -> ModelFile:
    """One decoder whose weights are the weighted mean of several decoders' (a model soup,
    Wortsman et al. 2022): decoders fine-tuned from one model (e.g. with different
    self-critical rewards) average into one that captions about as well as their ensemble,
    at the cost of one. They must share the decoder config, encoder and vocabulary."""
    if len(models) < 2:
        raise ModelFileError("averaging needs at least two model files")
    names = names or [f"model {i + 1}" for i in range(len(models))]
    weights = [1.0 / len(models)] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models) or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ModelFileError(f"averaging {len(models)} models needs {len(models)} non-negative weights, got {weights}")
    weights = [w / sum(weights) for w in weights]
    _check_compatible(models, names, "averaged")
    for name, model in zip(names, models):
        if model.ensemble:
            raise ModelFileError(f"{name}: an ensemble; average single decoders")
        if model.decoder_config != models[0].decoder_config:
            raise ModelFileError(f"{name}: its decoder ({model.decoder_config.to_dict()}) differs from "
                                 f"{names[0]}'s; only decoders of one architecture average")
    state = {key: sum(w * m.decoder_state[key].float() for w, m in zip(weights, models))
             for key in models[0].decoder_state}
    training = {"average_of": [model.training for model in models], "weights": weights}
    return ModelFile(state, models[0].decoder_config, models[0].vocabulary, models[0].encoder, None, training,
                     {}, decoding=models[0].decoding)


# ---- writing -----------------------------------------------------------------------------

def save_model(path: str | os.PathLike, model: ModelFile, dtype: torch.dtype = torch.float32) -> None:
    """Write `model` atomically; floating-point weights stored as `dtype` (float32 or float16)."""
    from captioner.version import __version__

    def stored(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        return (t.to(dtype) if t.is_floating_point() else t).contiguous()

    tensors = {f"decoder.{k}": stored(v) for k, v in model.decoder_state.items()}
    if model.encoder_state:
        tensors.update({f"encoder.{k}": stored(v) for k, v in model.encoder_state.items()})
    for i, (_, state) in enumerate(model.ensemble):
        tensors.update({f"ensemble.{i}.{k}": stored(v) for k, v in state.items()})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": model.name,
        "captioner_version": model.version or __version__,
        "encoder": json.dumps(model.encoder),
        "decoder": json.dumps(model.decoder_config.to_dict()),
        "vocabulary": model.vocabulary.to_json(),
        "decoding": json.dumps(model.decoding.to_dict()),
        "training": json.dumps(model.training),
        "scores": json.dumps(model.scores),
    }
    if model.ensemble:
        metadata["ensemble"] = json.dumps([config.to_dict() for config, _ in model.ensemble])
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ---- reading -----------------------------------------------------------------------------

def load_model(path: str | os.PathLike) -> ModelFile:
    """Read and validate a model file. Never unpickles; refuses anything inconsistent."""
    path = Path(path)
    shown = shown_path(path)
    _check_is_model_file(path, shown)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            header = {k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape())) for k in fh.keys()}
            model = _model_from_metadata(meta, shown)
            _check_tensor_header(model, header, shown)
            tensors = {k: fh.get_tensor(k) for k in header}
    except CaptionerError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        if _looks_pickled(path):
            raise ModelFileError(f"{shown}: a pickle or zip checkpoint, not a safetensors model file; it was not "
                                 "loaded (it could run code): convert a training checkpoint with "
                                 "`captioner export CKPT OUT.safetensors`") from None
        raise ModelFileError(f"{shown}: not a valid safetensors model file ({_first_line(exc)})") from None
    _fill_tensors(model, tensors, shown)
    return model


def _check_is_model_file(path: Path, shown: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"{shown}: no such model file") from None
    except OSError as exc:
        raise ModelFileError(f"{shown}: cannot read the model file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ModelFileError(f"{shown}: is a directory, not a model file")
    if not stat.S_ISREG(info.st_mode):
        raise ModelFileError(f"{shown}: not a regular file (a model file is one .safetensors file)")
    if path.suffix in (".ckpt", ".pt", ".pth", ".pkl", ".bin"):
        raise ModelFileError(f"{shown}: {path.suffix} files may contain pickled code and are not loaded; "
                             "convert a training checkpoint with `captioner export CKPT OUT.safetensors`")


def _looks_pickled(path: Path) -> bool:
    """A pickle (protocol 2+) or a torch zip checkpoint, by its first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return head == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _model_from_metadata(meta: dict[str, str], shown: str) -> ModelFile:
    """The metadata validated against the schema; tensors are filled in later."""
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{shown}: not a captioner model file (format={str(meta.get('format'))[:40]!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{shown}: model format version {str(version)[:20]!r} is not supported "
                             f"(this captioner reads versions {', '.join(READABLE_VERSIONS)})")
    field_name = "metadata"
    try:
        field_name = "decoder"
        config = _decoder_config(_json(meta, "decoder"))
        field_name = "ensemble"
        members = _json(meta, "ensemble", "[]")
        if not isinstance(members, list) or len(members) + 1 > MAX_MEMBERS:
            raise ValueError(f"must be a list of at most {MAX_MEMBERS - 1} decoder configs")
        if version == "1" and members:
            raise ValueError("an ensemble in a version 1 file")
        ensemble = [(_decoder_config(c), {}) for c in members]
        field_name = "vocabulary"
        vocab = Vocabulary.from_json(_text(meta, "vocabulary"))
        field_name = "encoder"
        encoder = _encoder_spec(_json(meta, "encoder"))
        field_name = "decoding"
        decoding = DecodingConfig.from_dict(_json(meta, "decoding", "{}"))
        field_name = "training"
        training = _json(meta, "training", "{}")
        if not isinstance(training, dict):
            raise ValueError("must be a JSON object")
        field_name = "scores"
        scores = _json(meta, "scores", "{}")
        if not isinstance(scores, dict):
            raise ValueError("must be a JSON object")
        name = meta.get("name", "")[:200]
    except (KeyError, TypeError, ValueError, RecursionError, OverflowError) as exc:
        raise ModelFileError(f"{shown}: damaged metadata: {field_name}: {_first_line(exc)}") from None
    from captioner.model.encoders import encoder_feature_dim
    if config.feature_dim != encoder_feature_dim(encoder["name"]):
        raise ModelFileError(f"{shown}: the decoder expects {config.feature_dim} feature channels but "
                             f"{encoder['name']} gives {encoder_feature_dim(encoder['name'])}")
    for i, (member, _) in enumerate([(config, {}), *ensemble]):
        what = "decoder" if i == 0 else f"ensemble member {i}"
        if member.vocab_size != len(vocab):
            raise ModelFileError(f"{shown}: vocabulary has {len(vocab)} words but the {what} expects {member.vocab_size}")
        if member.feature_dim != config.feature_dim:
            raise ModelFileError(f"{shown}: ensemble members expect different feature dimensions")
    return ModelFile({}, config, vocab, encoder, None, training, scores, ensemble, decoding, name,
                     meta.get("captioner_version", "")[:40])


def _text(meta: dict[str, str], key: str, default: str | None = None) -> str:
    text = meta.get(key, default)
    if text is None:
        raise KeyError(f"missing {key!r}")
    if len(text) > MAX_METADATA_CHARS:
        raise ValueError(f"{len(text):,} characters (at most {MAX_METADATA_CHARS:,})")
    return text


def _json(meta: dict[str, str], key: str, default: str | None = None) -> Any:
    return json.loads(_text(meta, key, default))  # RecursionError for absurd nesting: caught above


def _decoder_config(data: Any) -> DecoderConfig:
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object")
    config = DecoderConfig(**data)
    for name, high in MAX_DECODER_SIZES.items():
        if getattr(config, name) > high:
            raise ValueError(f"{name} {getattr(config, name)} is above the limit of {high}")
    return config


def _encoder_spec(data: Any) -> dict[str, Any]:
    from captioner.model.encoders import ENCODERS
    from captioner.model.preprocessing import Preprocessing
    if not isinstance(data, dict) or set(data) - {"name", "preprocessing", "finetuned"}:
        raise ValueError("must be {name, preprocessing, finetuned}")
    if data.get("name") not in ENCODERS:
        raise ValueError(f"unknown encoder {str(data.get('name'))[:60]!r}")
    if "preprocessing" not in data:
        raise ValueError("no preprocessing")
    Preprocessing.from_dict(data["preprocessing"])
    if not isinstance(data.get("finetuned", False), bool):
        raise ValueError("finetuned must be true or false")
    return data


def _expected_shapes(model: ModelFile) -> dict[str, tuple[int, ...]]:
    """Every tensor the configs imply, name -> shape, computed without allocating."""
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        for i, (config, _) in enumerate(model.members):
            prefix = "decoder." if i == 0 else f"ensemble.{i - 1}."
            shapes.update({prefix + k: tuple(v.shape) for k, v in CaptionDecoder(config).state_dict().items()})
        if model.encoder.get("finetuned"):
            from captioner.model.encoders import build_encoder
            encoder = build_encoder(model.encoder["name"], pretrained=False)
            shapes.update({f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()})
    return shapes


def _check_tensor_header(model: ModelFile, header: dict[str, tuple[str, tuple[int, ...]]], shown: str) -> None:
    expected = _expected_shapes(model)
    missing, stray = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing:
        raise ModelFileError(f"{shown}: weights do not match the config: missing {', '.join(missing[:3])}")
    if stray:
        raise ModelFileError(f"{shown}: unexpected tensors {', '.join(stray[:3])}")
    for key, shape in expected.items():
        dtype, stored = header[key]
        if stored != shape:
            raise ModelFileError(f"{shown}: weight {key} has shape {stored}, the config implies {shape}")
        if dtype not in _FLOAT_DTYPES and not key.endswith("num_batches_tracked"):
            raise ModelFileError(f"{shown}: weight {key} has dtype {dtype} (float32, float16 or bfloat16 expected)")


def _fill_tensors(model: ModelFile, tensors: dict[str, torch.Tensor], shown: str) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point():
            tensor = tensors[key] = tensor.float()
            if not torch.isfinite(tensor).all():
                raise ModelFileError(f"{shown}: weight {key} contains NaN or infinity")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.decoder_state = part("decoder.")
    model.ensemble = [(config, part(f"ensemble.{i}.")) for i, (config, _) in enumerate(model.ensemble)]
    model.encoder_state = part("encoder.") or None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
