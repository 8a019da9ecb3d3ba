"""The training settings a `CaptioningModule` takes, nested as the configs write them:
`model.decoder`, `model.optimization`, `model.self_critical` and `model.finetune`. Each validates its own fields when it is made."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from captioner.model.decoder import DecoderConfig
from captioner.model.self_critical import parse_reward

LR_SCHEDULES = ("plateau", "cosine", "none")


@dataclass
class DecoderSettings:
    """The decoder's architecture; its vocabulary size and feature width come from the data."""

    cell: str = "lstm"
    attention: bool = False
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5

    def config(self, vocab_size: int, feature_dim: int) -> DecoderConfig:
        return DecoderConfig(vocab_size=vocab_size, feature_dim=feature_dim, **asdict(self))


@dataclass
class OptimizationConfig:
    """Adam, its schedule, and the cross-entropy loss's terms.

    lr_schedule: plateau (halve on a dev BLEU-4 plateau), cosine (per step, with linear
    warm-up) or none. alpha_c weighs attention's doubly stochastic regularizer (every grid
    cell gets about one unit of attention over the caption)."""

    lr: float = 4e-4
    weight_decay: float = 0.0
    lr_schedule: str = "plateau"
    lr_patience: int = 1
    lr_factor: float = 0.5
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    alpha_c: float = 1.0

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")


@dataclass
class FinetuneConfig:
    """Encoder fine-tuning (`captioner.model.finetune.EncoderFinetuning`): the last `blocks`
    blocks open at epoch `unfreeze_at_epoch` with learning rate `lr`; `train_mode: false`
    keeps their BatchNorm statistics fixed while their weights learn."""

    blocks: int = 3
    lr: float = 1e-4
    unfreeze_at_epoch: int = 0
    train_mode: bool = True


@dataclass
class SelfCriticalConfig:
    """Self-critical sequence training (`captioner.model.self_critical`).

    reward: cider (CIDEr-D), bleu1..bleu4, or a sum such as cider+bleu1+bleu4; samples:
    captions drawn per image (the baseline is the mean of the others); max_length: words per
    sample; xe_weight w > 0 adds w x the cross-entropy of the batch's reference caption (the
    mixed objective of Paulus et al. 2018: the references keep the wording varied while the
    reward sharpens it). Needs data.captions_per_epoch: one."""

    reward: str = "cider"
    samples: int = 5
    max_length: int = 20
    xe_weight: float = 0.0

    def __post_init__(self) -> None:
        parse_reward(self.reward)  # fails early on an unknown term
        if self.samples < 2:
            raise ValueError(f"self_critical.samples must be >= 2 (the baseline is the other samples), got {self.samples}")
        if self.xe_weight < 0:
            raise ValueError(f"self_critical.xe_weight must be >= 0, got {self.xe_weight}")
