"""Python API: `Captioner.load(path=None).caption(images, beam_size=3)`.

Loads only torch, torchvision, Pillow and the model file (never Lightning, never pickle).
Images are decoded on a small thread pool (Pillow releases the GIL) one batch ahead of the
network, and each batch goes through the encoder and a batched search in one call.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import torch
from PIL import Image

from captioner.images import ImageLoadError, load_image, to_rgb
from captioner.model.decoder import CaptionDecoder
from captioner.model.ensemble import EnsembleDecoder
from captioner.model.search import SearchResult, decode_batch
from captioner.modelfile import ModelFile, ModelFileError, load_model
from captioner.text import Vocabulary

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default.safetensors"
ImageInput = Union[str, os.PathLike, Image.Image]


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
    attention: list[list[float]] | None = None   # per word, L weights over the grid
    grid_shape: tuple[int, int] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        if self.error:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "caption": self.caption, "log_prob": round(self.log_prob, 4),
                "alternatives": [{"caption": a.caption, "log_prob": round(a.log_prob, 4),
                                  "score": round(a.score, 4)} for a in self.alternatives]}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


class Captioner:
    """A loaded model, ready to caption. Build with `Captioner.load()`."""

    def __init__(self, model: ModelFile, device: str | torch.device = "auto", source: str = "",
                 precision: str = "auto") -> None:
        from captioner.model.encoders import Preprocessing, build_encoder
        from captioner.model.quantize import quantize_decoder, resolve_precision
        self.model = model
        self.source = source
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.precision = resolve_precision(precision, self.device)  # before any work: a bad ask fails fast
        self.vocabulary: Vocabulary = model.vocabulary
        self.preprocessing = Preprocessing.from_dict(model.encoder["preprocessing"])
        self.transform = self.preprocessing.transform()
        self.encoder = build_encoder(model.encoder["name"], pretrained=model.encoder_state is None)
        if model.encoder_state is not None:
            self.encoder.load_state_dict(model.encoder_state)
        self.encoder.eval().to(self.device)
        # Inference only: no parameter asks for gradients, so tensors made under
        # inference_mode (the encoder's features) can flow through any decoder method.
        self.decoder: CaptionDecoder | EnsembleDecoder = model.build_decoder().requires_grad_(False).to(self.device).fold_embedding()
        # The decoder's large products in int8 on CPU ('auto'): beam search 1.3x faster, the
        # shipped model's dev BLEU unchanged (captioner/model/quantize.py). The encoder stays
        # float32.
        if self.precision == "int8":
            quantize_decoder(self.decoder, self.encoder.feature_range)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "auto", precision: str = "auto") -> "Captioner":
        """Load a model file; `path=None` loads the default model shipped in the package.
        `precision`: 'auto' (int8 decoder products on a CPU with int8 kernels, else float32),
        'float32' or 'int8' (CPU only)."""
        if path is None:
            if not DEFAULT_MODEL.is_file():
                raise ModelFileError(f"{DEFAULT_MODEL}: no model yet: this install ships no default model; "
                                     "train one (`captioner train --config configs/flickr8k-lstm.yaml`) "
                                     "and pass it with --model")
            path = DEFAULT_MODEL
        return cls(load_model(path), device, source=str(path), precision=precision)

    # ---- captioning ------------------------------------------------------------------------
    def caption(self, images: ImageInput | Sequence[ImageInput], *, beam_size: int | None = None, n_best: int = 1,
                max_length: int = 30, length_penalty: float | None = None, sample: bool = False,
                temperature: float = 1.0, top_k: int = 0, seed: int | None = None, batch_size: int = 16,
                return_attention: bool = False, workers: int | None = None) -> list[CaptionResult]:
        """Caption images (paths or PIL images). A bad file gives a result with `.error` set;
        the others are captioned as usual. `beam_size` / `length_penalty` left at None use the
        model's dev-tuned settings (`search_defaults`)."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        return list(self.iter_captions(images, beam_size=beam_size, n_best=n_best, max_length=max_length,
                                       length_penalty=length_penalty, sample=sample, temperature=temperature,
                                       top_k=top_k, seed=seed, batch_size=batch_size,
                                       return_attention=return_attention, workers=workers))

    def iter_captions(self, images: Sequence[ImageInput], *, batch_size: int = 16, workers: int | None = None,
                      **search) -> Iterator[CaptionResult]:
        """Like caption(), yielding results in input order as each batch finishes."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        generator = None
        if search.get("seed") is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(search["seed"]))
        workers = workers or min(4, os.cpu_count() or 1)
        chunks = [list(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            submit = lambda chunk: [pool.submit(self._load_one, item) for item in chunk]  # noqa: E731
            pending = submit(chunks[0]) if chunks else []
            for i, chunk in enumerate(chunks):
                upcoming = submit(chunks[i + 1]) if i + 1 < len(chunks) else []  # decode one batch ahead
                loaded = [f.result() for f in pending]
                names = [_display_name(x) for x in chunk]
                yield from self._caption_prepared(names, [t for t, _ in loaded], [e for _, e in loaded],
                                                  generator, **search)
                pending = upcoming

    def _load_one(self, item: ImageInput) -> tuple[torch.Tensor | None, str | None]:
        try:
            return self.preprocess(item), None
        except ImageLoadError as exc:
            return None, exc.reason

    def preprocess(self, item: ImageInput) -> torch.Tensor:
        """Decode (JPEG at reduced size when large) and transform exactly as in training."""
        image = to_rgb(item) if isinstance(item, Image.Image) else load_image(
            item, draft_size=self.preprocessing.draft_size)
        return self.transform(image)

    def _caption_prepared(self, names, tensors, errors, generator, *, beam_size=None, n_best=1, max_length=30,
                          length_penalty=None, sample=False, temperature=1.0, top_k=0, seed=None,
                          return_attention=False) -> Iterator[CaptionResult]:
        good = [i for i, t in enumerate(tensors) if t is not None]
        results: dict[int, CaptionResult] = {}
        if good:
            batch = torch.stack([tensors[i] for i in good]).to(self.device)
            with torch.inference_mode():
                feats = self.encoder(batch)
                out = self.decode_features(feats.grid, feats.pooled, beam_size=beam_size, n_best=n_best,
                                           max_length=max_length, length_penalty=length_penalty, sample=sample,
                                           temperature=temperature, top_k=top_k, generator=generator,
                                           return_attention=return_attention)
            for j, i in enumerate(good):
                results[i] = self._result(names[i], out, j)
        for i, name in enumerate(names):
            yield results.get(i) or CaptionResult(image=name, error=errors[i])

    @property
    def search_defaults(self) -> dict[str, float]:
        """Beam size and length penalty used when a caller gives none: the model file's
        `decoding` (chosen on dev when it was shipped), else beam 3 without a penalty."""
        return {"beam_size": int(self.model.decoding.get("beam_size", 3)),
                "length_penalty": float(self.model.decoding.get("length_penalty", 0.0))}

    def search_settings(self, beam_size: int | None = None, length_penalty: float | None = None) -> tuple[int, float]:
        """(beam size, length penalty): the given values, the model's defaults for those left None."""
        defaults = self.search_defaults
        return (defaults["beam_size"] if beam_size is None else beam_size,
                defaults["length_penalty"] if length_penalty is None else length_penalty)

    def decode_features(self, grid: torch.Tensor | None, pooled: torch.Tensor, *, beam_size: int | None = None,
                        n_best: int = 1, max_length: int = 30, length_penalty: float | None = None,
                        sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                        generator: torch.Generator | None = None, return_attention: bool = False) -> SearchResult:
        """Search from encoder features (also used by evaluation on a FeatureCache)."""
        beam_size, length_penalty = self.search_settings(beam_size, length_penalty)
        if not sample and n_best > beam_size:
            raise ValueError(f"--n-best {n_best} needs --beam-size >= {n_best}")
        with torch.inference_mode():
            memory = self.decoder.memory(None if grid is None else grid.float().to(self.device),
                                         pooled.float().to(self.device))
            return decode_batch(self.decoder, memory, beam_size=beam_size, max_length=max_length,
                                length_alpha=length_penalty, n_best=n_best, sample_captions=sample,
                                temperature=temperature, top_k=top_k, generator=generator,
                                return_attention=return_attention,
                                no_end_after=self.vocabulary.bad_ending_ids())

    def _result(self, name: str, out: SearchResult, j: int) -> CaptionResult:
        alternatives = [Alternative(self.vocabulary.decode(out.tokens[j, n].tolist()),
                                    float(out.log_probs[j, n]), float(out.scores[j, n]))
                        for n in range(out.tokens.shape[1])]
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
    return str(item)
