"""How an image becomes an encoder's input; the spec travels with the encoder's weights.

In the spirit of torchvision's `weights.transforms()`: every encoder carries the
`Preprocessing` its weights were trained with, and feature caches and model files store it,
so inference always prepares images exactly as training did and no caller can pick the
wrong normalization.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite normalizes 0..255 pixels as (x - 127) / 128, i.e. on a 0..1 scale
# mean 127/255 and std 128/255 (mapping pixels to about [-1, 1]).
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3

RESIZE_MODES = ("squash", "shorter+center-crop")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MAX_SIZE = 1024  # input side; a stored 30000 would cost gigabytes per image before any check


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for an encoder; stored in caches and model files.

    `resize`: "squash" resizes straight to size x size (aspect ratio not kept);
    "shorter+center-crop" resizes the shorter side to `resize_size` (default `size`) and
    crops the centre size x size, as torchvision's classification transforms do.
    `mean`/`std` apply to pixels scaled to 0..1.
    """

    size: int
    resize: str = "squash"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("size", "resize_size"):
            value = getattr(self, name)
            if value is None and name == "resize_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= MAX_SIZE:
                raise ValueError(f"preprocessing {name} must be an integer from 16 to {MAX_SIZE}, got {value!r}")
        if self.resize_size is not None and self.resize_size < self.size:
            raise ValueError(f"preprocessing resize_size {self.resize_size} is below size {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"preprocessing resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocessing interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(map(_finite_number, values)):
                raise ValueError(f"preprocessing {name} needs 3 finite numbers, got {values!r}")
            # Lists arrive from JSON; keep the frozen value hashable and comparable.
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if min(self.std) <= 0:
            raise ValueError(f"preprocessing std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of `to_dict`; unknown keys are an error so a newer format is not misread."""
        if not isinstance(data, dict):
            raise ValueError(f"preprocessing must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        if "size" not in data:
            raise ValueError("preprocessing has no size")
        return cls(**data)

    @property
    def draft_size(self) -> tuple[int, int]:
        """(w, h) a JPEG may be draft-decoded down to and still be resized without upsampling.

        Draft decoding keeps both sides >= this, so the shorter side stays >= the resize
        target in either mode.
        """
        side = self.resize_size or self.size
        return (side, side)

    def transform(self, augment: bool = False) -> Callable[[Any], Tensor]:
        """PIL RGB image -> normalized float32 tensor [3, size, size].

        `augment` (training on raw images) swaps the fixed geometry for a mild random crop
        and adds colour jitter. No horizontal flips: captions say "left" and "right".
        """
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import v2 as T

        mode = InterpolationMode(self.interpolation)
        if augment:
            geometry = [
                T.RandomResizedCrop(self.size, scale=(0.7, 1.0), interpolation=mode, antialias=True),
                T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            ]
        elif self.resize == "squash":
            geometry = [T.Resize((self.size, self.size), interpolation=mode, antialias=True)]
        else:
            geometry = [
                T.Resize(self.resize_size or self.size, interpolation=mode, antialias=True),
                T.CenterCrop(self.size),
            ]
        return T.Compose([
            T.ToImage(),  # uint8 tensor; resizing it is faster than resizing the PIL image
            *geometry,
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(self.mean, self.std),
        ])
