"""Python API: `Captioner.load().caption("photo.jpg")`.

Loads only torch, torchvision, Pillow and the model file (never Lightning, never pickle).
Images are decoded on a small thread pool (Pillow releases the GIL) one batch ahead of the
network; each batch goes through the encoder and one batched search. Search settings are a
`DecodingConfig`: the model's own default (`Captioner.decoding`), or any field overridden per
call (`caption(images, beam_size=5)`).

The encoder runs eagerly in PyTorch, or, on the CPU with the `onnx` extra installed, through
ONNX Runtime (`model/fast_encoder.py`: about 2x the images per second, the same features to
~5e-5). `encoder_backend` (or $CAPTIONER_ENCODER_BACKEND) picks: auto (ONNX Runtime where it
can run, else eager), onnxruntime (required) or eager.
"""
from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

import torch
from PIL import Image

from captioner.decoding import DecodingConfig
from captioner.errors import DeviceError, ImageLoadError, ModelFileError, UsageError
from captioner.images import load_image, to_rgb
from captioner.model.encoders import Features, build_encoder
from captioner.model.fast_encoder import BACKENDS as ENCODER_BACKENDS
from captioner.model.fast_encoder import default_cache_dir, fast_encoder, unavailable_reason
from captioner.model.inference import fast_decoder, resolve_precision
from captioner.model.preprocessing import Preprocessing
from captioner.model.search import SearchResult, decode
from captioner.modelfile import ModelFile, load_model
from captioner.text import Vocabulary

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "default.safetensors"
ENCODER_BACKEND_ENV = "CAPTIONER_ENCODER_BACKEND"
ImageInput = Union[str, os.PathLike, Image.Image]

__all__ = ["Alternative", "CaptionResult", "Captioner", "DEFAULT_MODEL", "ENCODER_BACKENDS", "model_path",
           "resolve_device", "resolve_encoder_backend", "shipped_models"]


def shipped_models() -> dict[str, Path]:
    """The model files that ship inside the package, by name ("default" among them)."""
    return {p.stem: p for p in sorted(ASSETS.glob("*.safetensors"))}


def model_path(model: str | os.PathLike | None = None) -> Path:
    """A model file's path: the given file, else a shipped model of that name, else (None)
    the default model. A name that is neither is left for `load_model` to refuse."""
    if model is None:
        if not DEFAULT_MODEL.is_file():
            raise ModelFileError(f"{DEFAULT_MODEL}: this install ships no default model; train one "
                                 "(docs/training.md) and pass it with --model")
        return DEFAULT_MODEL
    path = Path(model)
    if not os.path.lexists(path) and str(model) in shipped_models():
        return shipped_models()[str(model)]
    return path


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return round(value, 4) if math.isfinite(value) else None


@dataclass
class Alternative:
    caption: str
    log_prob: float
    score: float


@dataclass
class CaptionResult:
    """One image's answer. `error` is set (and the rest empty) when the image was unusable."""

    image: str
    caption: str = ""
    log_prob: float = float("nan")
    score: float = float("nan")
    words: list[str] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)
    attention: list[list[float]] | None = None   # per word (and <end>), L weights over the grid
    grid_shape: tuple[int, int] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (no NaN or infinity anywhere)."""
        if self.error:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "caption": self.caption, "log_prob": _finite(self.log_prob),
                "alternatives": [{"caption": a.caption, "log_prob": _finite(a.log_prob), "score": _finite(a.score)}
                                 for a in self.alternatives]}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; an impossible ask raises DeviceError."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda was asked for but torch sees no CUDA device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r} (auto, cpu or cuda)") from None


def resolve_encoder_backend(backend: str | None = None) -> str:
    """`backend`, else $CAPTIONER_ENCODER_BACKEND, else auto; checked."""
    chosen = backend or os.environ.get(ENCODER_BACKEND_ENV) or "auto"
    if chosen not in ENCODER_BACKENDS:
        where = f"${ENCODER_BACKEND_ENV}" if backend is None else "encoder backend"
        raise UsageError(f"{where}: unknown encoder backend {chosen!r} ({', '.join(ENCODER_BACKENDS)})")
    return chosen


class Captioner:
    """A loaded model, ready to caption. Build with `Captioner.load()`."""

    def __init__(self, model: ModelFile, device: str | torch.device = "auto", source: str = "",
                 encoder_backend: str | None = None) -> None:
        self.encoder_backend = resolve_encoder_backend(encoder_backend)
        self.model = model
        self.source = source
        self.device = resolve_device(device)
        self.vocabulary: Vocabulary = model.vocabulary
        self.decoding: DecodingConfig = model.decoding
        self.preprocessing = Preprocessing.from_dict(model.encoder["preprocessing"])
        self.transform = self.preprocessing.transform()
        self.encoder = build_encoder(model.encoder["name"], pretrained=model.encoder_state is None)
        if model.encoder_state is not None:
            self.encoder.load_state_dict(model.encoder_state)
        self.encoder.eval().to(self.device)
        # Inference only: no parameter asks for gradients, so tensors made under
        # inference_mode (the encoder's features) can flow through any decoder method.
        self.decoder = model.build_decoder().requires_grad_(False).to(self.device)
        self._fast: dict[str, torch.nn.Module] = {}  # precision -> inference form (model/inference.py)
        self._encoder_runner: Any = None  # the encoder that runs: resolved on first use

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str | torch.device = "auto",
             encoder_backend: str | None = None) -> Captioner:
        """Load a model file, or a model shipped in the package by name (`shipped_models()`);
        `path=None` loads the default model. `encoder_backend`: auto, onnxruntime or eager
        (default: $CAPTIONER_ENCODER_BACKEND, else auto)."""
        path = model_path(path)
        return cls(load_model(path), device, source=str(path), encoder_backend=encoder_backend)

    @property
    def has_attention(self) -> bool:
        return bool(self.decoder.config.attention)

    def info(self) -> dict[str, Any]:
        """What the model is: name, release, encoder, decoders, default decoding and scores."""
        members = [config.to_dict() for config, _ in self.model.members]
        return {"name": self.model.name or Path(self.source).stem, "version": self.model.version,
                "source": self.source, "encoder": self.model.encoder["name"],
                "finetuned_encoder": bool(self.model.encoder.get("finetuned")), "decoders": members,
                "vocabulary": len(self.vocabulary), "attention": self.has_attention,
                "decoding": self.decoding.to_dict(), "scores": self.model.scores, "device": str(self.device)}

    def settings(self, decoding: DecodingConfig | None = None, **overrides: Any) -> DecodingConfig:
        """The decoding a call uses: `decoding` (default: the model's) with `overrides` applied."""
        return (decoding or self.decoding).replace(**overrides)

    def decoder_for(self, precision: str) -> torch.nn.Module:
        """The inference decoder for `precision` ('auto' resolved for this device), built once."""
        precision = resolve_precision(precision, self.device)
        if precision not in self._fast:
            self._fast[precision] = fast_decoder(self.decoder, precision, self.encoder.feature_range)
        return self._fast[precision]

    # ---- captioning ------------------------------------------------------------------------
    def caption(self, images: ImageInput | Sequence[ImageInput], decoding: DecodingConfig | None = None, *,
                batch_size: int = 16, return_attention: bool = False, workers: int | None = None,
                **overrides: Any) -> list[CaptionResult]:
        """Caption images (paths or PIL images). A bad file gives a result with `.error` set;
        the others are captioned as usual."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        return list(self.iter_captions(images, decoding, batch_size=batch_size, return_attention=return_attention,
                                       workers=workers, **overrides))

    def iter_captions(self, images: Iterable[ImageInput], decoding: DecodingConfig | None = None, *,
                      batch_size: int = 16, return_attention: bool = False, workers: int | None = None,
                      **overrides: Any) -> Iterator[CaptionResult]:
        """Like caption(), for any iterable (read lazily), yielding results in input order as
        each batch finishes."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        config = self.settings(decoding, **overrides)
        self.decoder_for(config.precision)  # an impossible precision fails before any image is read
        self.encoder_runner()  # so does an encoder backend that cannot run
        generator = None if config.seed is None else torch.Generator(device=self.device).manual_seed(config.seed)
        chunks = iter(lambda it=iter(images): list(itertools.islice(it, batch_size)), [])
        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            def submit(chunk: list[ImageInput]) -> list:
                return [pool.submit(self._load_one, item) for item in chunk]

            chunk = next(chunks, None)
            pending = submit(chunk) if chunk else []
            while chunk:
                upcoming_chunk = next(chunks, None)
                upcoming = submit(upcoming_chunk) if upcoming_chunk else []  # decode one batch ahead
                loaded = [f.result() for f in pending]
                yield from self._caption_loaded([_display_name(x) for x in chunk], loaded, config, generator,
                                                return_attention)
                chunk, pending = upcoming_chunk, upcoming

    def _load_one(self, item: ImageInput) -> tuple[torch.Tensor | None, str | None]:
        try:
            return self.preprocess(item), None
        except ImageLoadError as exc:
            return None, exc.reason

    def preprocess(self, item: ImageInput) -> torch.Tensor:
        """Decode (a large JPEG at reduced size) and transform exactly as in training: [3,H,W]."""
        image = to_rgb(item) if isinstance(item, Image.Image) else load_image(
            item, draft_size=self.preprocessing.draft_size)
        return self.transform(image)

    def _caption_loaded(self, names: list[str], loaded: list[tuple[torch.Tensor | None, str | None]],
                        config: DecodingConfig, generator: torch.Generator | None,
                        return_attention: bool) -> Iterator[CaptionResult]:
        good = [i for i, (tensor, _) in enumerate(loaded) if tensor is not None]
        results: dict[int, CaptionResult] = {}
        if good:
            features = self.encode(torch.stack([loaded[i][0] for i in good]))
            answers = self.decode_features(features, config, names=[names[i] for i in good],
                                           generator=generator, return_attention=return_attention)
            results = dict(zip(good, answers))
        for i, name in enumerate(names):
            yield results.get(i) or CaptionResult(image=name, error=loaded[i][1])

    def encoder_runner(self) -> Any:
        """The encoder that runs: ONNX Runtime's form where the backend allows it and it can
        run (a CPU, the onnx extra; exported once into `default_cache_dir()`), else the eager
        one. Decided on first use, so loading a model costs no export."""
        if self._encoder_runner is None:
            fast = None
            if self.encoder_backend != "eager" and self.device.type == "cpu":
                fast = fast_encoder(self.encoder, self.encoder_backend, default_cache_dir())
            if fast is None and self.encoder_backend == "onnxruntime":
                reason = (f"the model runs on {self.device.type}; ONNX Runtime runs the encoder on the CPU"
                          if self.device.type != "cpu" else
                          unavailable_reason(self.encoder, self.encoder_backend, default_cache_dir())
                          or "its export failed (see the warning above)")
                raise UsageError(f"encoder backend onnxruntime cannot run: {reason}")
            self._encoder_runner = fast or self.encoder
        return self._encoder_runner

    @property
    def encoder_backend_in_use(self) -> str:
        """"onnxruntime" or "eager": what `encode` runs (resolving it if need be)."""
        return getattr(self.encoder_runner(), "backend", "eager")

    def encode(self, images: torch.Tensor) -> Features:
        """Preprocessed images [B,3,H,W] -> the encoder's Features."""
        with torch.inference_mode():
            return self.encoder_runner()(images.to(self.device))

    def decode_features(self, features: Features, decoding: DecodingConfig | None = None, *,
                        names: Sequence[str] | None = None, generator: torch.Generator | None = None,
                        return_attention: bool = False, **overrides: Any) -> list[CaptionResult]:
        """Captions from encoder Features (of `encode`, or of a FeatureCache): one result per row."""
        config = self.settings(decoding, **overrides)
        decoder = self.decoder_for(config.precision)
        grid = None if features.grid is None else features.grid.float().to(self.device)
        with torch.inference_mode():
            memory = decoder.memory(grid, features.pooled.float().to(self.device))
            out = decode(decoder, memory, config, generator=generator, return_attention=return_attention,
                         no_end_after=self.vocabulary.bad_ending_ids())
        names = names or [f"<features {i}>" for i in range(features.pooled.shape[0])]
        return [self._result(name, out, j) for j, name in enumerate(names)]

    def _result(self, name: str, out: SearchResult, j: int) -> CaptionResult:
        alternatives = [Alternative(self.vocabulary.decode(out.tokens[j, n].tolist()), float(out.log_probs[j, n]),
                                    float(out.scores[j, n])) for n in range(out.tokens.shape[1])]
        best = alternatives[0]
        result = CaptionResult(image=name, caption=best.caption, log_prob=best.log_prob, score=best.score,
                               words=best.caption.split(), alternatives=alternatives)
        if out.attention is not None:
            n_words = len(result.words) + 1  # the <end> step too
            result.attention = out.attention[j, 0, :n_words].float().cpu().tolist()
            side = int(round(out.attention.shape[-1] ** 0.5))
            result.grid_shape = (side, out.attention.shape[-1] // side)
        return result


def _display_name(item: ImageInput) -> str:
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or "<image>"
    return os.fspath(item)
