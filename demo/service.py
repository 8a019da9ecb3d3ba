"""The captioning service behind the HTTP layer: the model, its lock, and admission.

Why a service object: the model is loaded once and shared by every request thread. Image
decoding and preprocessing run in the request's own thread (Pillow and torch release the
GIL), each admitted against a shared memory budget (demo/admission.py); the encoder and the
search hold one lock, so requests never interleave inside the network. torch's intra-op
threads already use every core for one image, so serializing costs little throughput and
buys certainty. Only the public `captioner` API is used.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from PIL import Image

from captioner import Captioner
from captioner.decoding import DecodingConfig
from captioner.errors import DecodingConfigError, ImageLoadError
from captioner.images import load_image
from demo.admission import BudgetTimeout, MemoryBudget, upload_cost
from demo.errors import RequestError, busy
from demo.limits import MIB, Limits

MAX_BEAM = 10      # beams (and n-best captions) one demo request may ask for: ~10x a greedy search
QUERY_FIELDS = ("beam_size", "n_best")


@contextlib.contextmanager
def private_file(data: bytes | bytearray | memoryview) -> Iterator[str]:
    """A path holding `data` that only this process can see, gone after the block.

    `load_image` takes paths (it checks the file's type and size through the file system),
    so an upload is written to an anonymous in-memory file (Linux memfd) rather than to a
    second, weaker decoding path; elsewhere to a private temporary file, deleted at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("captioner-upload", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as out:
                out.write(data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="captioner-upload-", suffix=".img") as tmp:
        tmp.write(data)
        tmp.flush()
        yield tmp.name


def view_box(preprocessing: Any, width: int, height: int) -> list[float]:
    """The part of the image the encoder saw, as fractions [x0, y0, x1, y1]: the attention
    grid covers exactly this region, so the page draws heatmaps over it (the whole image
    when squashed, the centre square when the model crops)."""
    if preprocessing.resize == "squash":
        return [0.0, 0.0, 1.0, 1.0]
    side = min(width, height) * preprocessing.size / (preprocessing.resize_size or preprocessing.size)
    fx, fy = side / width, side / height
    return [round((1 - fx) / 2, 4), round((1 - fy) / 2, 4), round((1 + fx) / 2, 4), round((1 + fy) / 2, 4)]


def finite(value: float, digits: int = 4) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return round(value, digits) if math.isfinite(value) else None


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


class CaptionService:
    """The loaded model, shared safely by request threads, with its memory budget."""

    def __init__(self, captioner: Captioner, limits: Limits) -> None:
        self.captioner = captioner
        self.limits = limits
        self.lock = threading.Lock()
        self.budget = MemoryBudget(limits.memory_budget_bytes, limits.reserve_bytes, limits.small_image_bytes)
        self.attention = captioner.has_attention
        default = captioner.decoding
        beam = min(default.beam_size, MAX_BEAM)
        self.default_decoding = default.replace(beam_size=beam, n_best=min(default.n_best, beam))

    def info(self) -> dict[str, Any]:
        """What the page shows about the model."""
        info = self.captioner.info()
        return {"model": Path(self.captioner.source).name or info["name"], "version": info["version"],
                "attention": self.attention, "device": info["device"],
                "beam_size": self.default_decoding.beam_size, "n_best": self.default_decoding.n_best,
                "max_beam_size": MAX_BEAM}

    def decoding_from_query(self, query: str) -> DecodingConfig:
        """`beam_size` and `n_best` from a query string, checked by DecodingConfig (400 with
        its one-line reason) and held to MAX_BEAM, since every request shares one model."""
        try:
            pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=len(QUERY_FIELDS) * 2)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "too many query parameters") from None
        changes: dict[str, int] = {}
        for name, text in pairs:
            if name not in QUERY_FIELDS:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown query parameter {name[:40]!r} "
                                                           f"(accepted: {', '.join(QUERY_FIELDS)})")
            if name in changes:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"query parameter {name} given more than once")
            if not (text.isascii() and text.isdigit() and len(text) <= 6):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"decoding {name} must be an integer, got {text[:20]!r}")
            changes[name] = int(text)
            if not 1 <= changes[name] <= MAX_BEAM:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"decoding {name} must be between 1 and {MAX_BEAM} "
                                                           f"in this demo, got {changes[name]}")
        if "beam_size" in changes and "n_best" not in changes:
            changes["n_best"] = min(self.default_decoding.n_best, changes["beam_size"])
        try:
            return self.default_decoding.replace(**changes)
        except DecodingConfigError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None

    def warm_up(self) -> None:
        """Caption a blank image once, so the first visitor's timings are not the cold start's
        (lazy initialization in torch and Pillow costs a few hundred milliseconds)."""
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, format="PNG")
        self.caption(buffer.getvalue(), self.default_decoding)

    def admit(self, path: str) -> int:
        """The upload's memory cost from its header: 400 for a file load_image refuses up
        front, 413 for one that alone needs more than the largest admissible cost."""
        try:
            cost = upload_cost(path, self.captioner.preprocessing.draft_size, self.limits.max_upload_bytes)
        except ImageLoadError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, exc.reason) from None
        if cost > self.budget.largest:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"image too large to decode here: it needs about {cost / MIB:,.0f} MiB, over the "
                               f"limit of {self.budget.largest / MIB:,.0f} MiB per image")
        return cost

    def prepare(self, path: str) -> tuple[tuple[int, int], Any]:
        """Decode and preprocess an admitted upload: (decoded size, batch [1, 3, H, W])."""
        c = self.captioner
        try:
            image = load_image(path, draft_size=c.preprocessing.draft_size, max_bytes=self.limits.max_upload_bytes,
                               max_decode_bytes=self.budget.largest, max_seconds=self.limits.decode_seconds)
        except ImageLoadError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, exc.reason) from None
        return image.size, c.preprocess(image).unsqueeze(0)

    def caption(self, data: bytes | bytearray | memoryview, decoding: DecodingConfig) -> dict[str, Any]:
        """Caption uploaded bytes; the JSON answer with per-stage timings in milliseconds."""
        if not len(data):
            raise RequestError(HTTPStatus.BAD_REQUEST, "empty upload: no image data received")
        c = self.captioner
        start = time.perf_counter()
        with private_file(data) as path:
            cost = self.admit(path)
            waiting = time.perf_counter()
            try:
                with self.budget.hold(cost, self.limits.admission_seconds):
                    admitted = time.perf_counter()
                    size, batch = self.prepare(path)
            except BudgetTimeout:
                raise busy(f"server busy decoding other large images; waited {self.limits.admission_seconds:g} s",
                           retry_after_s=5) from None
        decoded = time.perf_counter()
        with self.lock:
            locked = time.perf_counter()
            features = c.encode(batch)
            encoded = time.perf_counter()
            [result] = c.decode_features(features, decoding, names=["upload"], return_attention=self.attention)
            searched = time.perf_counter()
        return {
            "caption": result.caption,
            "log_prob": finite(result.log_prob),
            "score": finite(result.score),
            "words": result.words,
            "alternatives": [{"caption": a.caption, "log_prob": finite(a.log_prob), "score": finite(a.score)}
                             for a in result.alternatives],
            "attention": (None if result.attention is None
                          else [[finite(w, 5) for w in step] for step in result.attention]),
            "grid_shape": list(result.grid_shape) if result.grid_shape else None,
            "view_box": view_box(c.preprocessing, *size),
            "beam_size": decoding.beam_size,
            "n_best": decoding.n_best,
            "timings_ms": {"decode": ms((waiting - start) + (decoded - admitted)),
                           "queue": ms((admitted - waiting) + (locked - decoded)),
                           "encoder": ms(encoded - locked), "search": ms(searched - encoded),
                           "total": ms(time.perf_counter() - start)},
        }

    def state(self) -> dict[str, int]:
        return self.budget.state()
