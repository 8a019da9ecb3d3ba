"""Encoder fine-tuning as a Lightning `BaseFinetuning` callback.

With `data.mode: images` the encoder runs inside the training loop, frozen. This callback
opens its last `blocks` blocks (EfficientNet-Lite's MBConv blocks and head, ResNet's
bottlenecks) at epoch `unfreeze_at_epoch` with their own learning rate, the standard way to
adapt ImageNet features to captions once the decoder has converged on them (start the run
from that decoder with `model.init_decoder`). Blocks left frozen stay in eval mode.
`train_mode: false` keeps the opened blocks in eval mode too while they learn: BatchNorm keeps
its ImageNet statistics, so features change through the weights alone.

    trainer:
      callbacks:
        - class_path: captioner.model.finetune.EncoderFinetuning
          init_args: {blocks: 3, lr: 1.0e-4}
"""
from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning
from torch.optim import Optimizer

from captioner.errors import TrainingError


class EncoderFinetuning(BaseFinetuning):
    def __init__(self, blocks: int = 3, lr: float = 1e-4, unfreeze_at_epoch: int = 0, train_mode: bool = True) -> None:
        super().__init__()
        if blocks < 1:
            raise TrainingError(f"EncoderFinetuning blocks must be >= 1, got {blocks}")
        if not lr > 0:
            raise TrainingError(f"EncoderFinetuning lr must be positive, got {lr}")
        self.blocks, self.lr, self.unfreeze_at_epoch, self.train_mode = blocks, lr, unfreeze_at_epoch, train_mode

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "encoder", None) is None:
            raise TrainingError("EncoderFinetuning needs data.mode: images (the encoder runs in the loop)")
        super().on_fit_start(trainer, pl_module)

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.encoder, train_bn=False)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if epoch < self.unfreeze_at_epoch:
            return
        encoder = pl_module.encoder
        tail = encoder.blocks[-min(self.blocks, len(encoder.blocks)):]
        if epoch == self.unfreeze_at_epoch:
            self.unfreeze_and_add_param_group(tail, optimizer, lr=self.lr, train_bn=True)
        elif not any(p.requires_grad for block in tail for p in block.parameters()):
            self.make_trainable(tail)  # a resumed run: on_fit_start restored the param group
        encoder.trainable_tail(len(tail), train_mode=self.train_mode)
        pl_module.encoder_trained = True
