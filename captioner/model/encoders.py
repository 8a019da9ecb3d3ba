"""The encoder registry: `build_encoder(name)`, and each encoder's feature width and
preprocessing without loading its weights.

Every encoder carries the preprocessing its weights were trained with (`Preprocessing`), so
the transform, the feature cache and the model file all take it from the encoder.
`efficientnet-lite0` is the offline default (its weights ship in a pip package);
`efficientnet-lite1` / `-lite2` need the `lite` extra; torchvision backbones need their
weights in torch.hub's cache (`backbones.py`).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from captioner.errors import UnknownEncoderError
from captioner.model.backbones import LITE_NATIVE_SIZES, build_lite, build_torchvision
from captioner.model.encoder import Encoder, Features
from captioner.model.preprocessing import Preprocessing

__all__ = ["ENCODERS", "Encoder", "Features", "Preprocessing", "available_encoders", "build_encoder",
           "encoder_feature_dim", "encoder_preprocessing"]

_TORCHVISION_NAMES = (
    "resnet18", "resnet50", "resnet101", "resnet152", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "convnext_tiny",
)

ENCODERS: dict[str, Callable[[bool], Encoder]] = {
    **{variant: functools.partial(build_lite, variant) for variant in LITE_NATIVE_SIZES},
    **{name: functools.partial(build_torchvision, name) for name in _TORCHVISION_NAMES},
}


def available_encoders() -> list[str]:
    return list(ENCODERS)


def _builder(name: str) -> Callable[[bool], Encoder]:
    try:
        return ENCODERS[name]
    except KeyError:
        raise UnknownEncoderError(f"unknown encoder {name!r}; available: {', '.join(ENCODERS)}") from None


def build_encoder(name: str, pretrained: bool = True) -> Encoder:
    """A frozen encoder in eval mode. `pretrained=False` gives random weights (tests)."""
    return _builder(name)(pretrained)


@functools.lru_cache(maxsize=None)
def _shape_only(name: str) -> Encoder:
    """The encoder's structure on the meta device: shapes without weights, memory or time."""
    with torch.device("meta"):
        return _builder(name)(False)


def encoder_feature_dim(name: str) -> int:
    """C of `name`'s features, without loading weights (sizes the decoder before training)."""
    return _shape_only(name).feature_dim


def encoder_preprocessing(name: str) -> Preprocessing:
    """`name`'s preprocessing, without loading weights or needing them cached."""
    return _shape_only(name).preprocessing
