"""The image encoder: a CNN body that maps images to a grid of region features.

    images [B, 3, H, W] --body--> feature map [B, C, h, w] --> Features(grid [B, h*w, C],
                                                                        pooled [B, C])

The body is an `nn.Sequential` whose children are the fine-tuning units ("blocks"), so
`trainable_tail(n)` is just "unfreeze the last n children". The backbones that fill it are in
`backbones.py`, the registry of names in `encoders.py`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captioner.model.preprocessing import Preprocessing


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
