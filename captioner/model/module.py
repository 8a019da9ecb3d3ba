"""LightningModule: the math of training a captioner. The Trainer owns the loop, the
DataModule the data, callbacks the rest.

Two modes: `features` (frozen encoder, batches carry cached Features: the fast default) and
`images` (batches carry pixels; the encoder runs in the loop and its last blocks can be
fine-tuned). Validation decodes greedily (no teacher forcing) and logs corpus BLEU-1..4 over
every dev image exactly once, also under DDP.
"""
from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.nn import functional as F

from captioner.metrics import bleu_scores, diversity_scores
from captioner.model.decoder import CaptionDecoder, DecoderConfig, Memory
from captioner.model.search import greedy
from captioner.model.self_critical import Reward, build_reward, parse_reward, self_critical_loss
from captioner.text import Vocabulary


class TrainingSetupError(ValueError):
    """Model and data settings that cannot train together (found once both exist)."""


class CaptioningModule(pl.LightningModule):
    def __init__(
        self,
        vocab_size: int = 0,
        feature_dim: int = 0,
        cell: str = "lstm",
        attention: bool = False,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.5,
        alpha_c: float = 1.0,
        label_smoothing: float = 0.0,
        scheduled_sampling: float = 0.0,
        scheduled_sampling_ramp_epochs: int = 0,
        lr: float = 4e-4,
        weight_decay: float = 0.0,
        lr_schedule: str = "plateau",
        lr_patience: int = 1,
        lr_factor: float = 0.5,
        warmup_steps: int = 0,
        max_decode_length: int = 30,
        mode: str = "features",
        encoder: str = "efficientnet-lite0",
        finetune_blocks: int = 0,
        encoder_lr: float = 1e-4,
        finetune_train_mode: bool = True,
        init_decoder: str | None = None,
        self_critical: bool = False,
        self_critical_reward: str = "cider",
        self_critical_samples: int = 5,
        self_critical_max_length: int = 20,
        self_critical_xe_weight: float = 0.0,
    ) -> None:
        """vocab_size and feature_dim are linked from the DataModule by LightningCLI.

        `init_decoder`: a model file whose decoder weights this run starts from, e.g. to
        fine-tune the encoder's last blocks (mode images) once a decoder trained on cached
        features has converged. Its decoder config, vocabulary and encoder must match this
        run's; a resumed run (--ckpt_path) takes its weights from the checkpoint instead.
        `finetune_train_mode=False` keeps the opened blocks in eval mode while they learn
        (fixed BatchNorm statistics, no drop-connect). `scheduled_sampling`: the probability
        of feeding the decoder its own previous word in training (`CaptionDecoder.forward`);
        with `scheduled_sampling_ramp_epochs` N > 0 it rises linearly from 0 at the first
        epoch to that value at epoch N (Bengio et al. 2015 raise it as the model learns: early
        on, its own words are noise).

        `self_critical`: train on a caption metric instead of cross-entropy
        (`captioner.model.self_critical`; `self_critical_reward`: cider = CIDEr-D, bleu1..bleu4,
        or a sum such as bleu1+bleu4), on `self_critical_samples` captions of up to
        `self_critical_max_length` words sampled per image. It fine-tunes a converged decoder
        (start it from one with `init_decoder`) and needs the data's `captions_per_epoch: one`
        (each image once per epoch, scored against all its captions). `self_critical_xe_weight`
        w > 0 adds w x the cross-entropy loss of the batch's reference caption (with attention's
        regularizer, as in cross-entropy training) to the self-critical loss (the mixed objective
        of Paulus et al. 2018): the references keep pulling the decoder towards their spread of
        wordings while the reward sharpens it, where the reward alone collapses it to a few safe
        captions.
        """
        super().__init__()
        self.save_hyperparameters()
        if vocab_size < 5 or feature_dim < 1:
            raise ValueError("vocab_size and feature_dim must come from the data (link data.vocab_size / "
                             "data.feature_dim); got vocab_size={vocab_size}, feature_dim={feature_dim}")
        if lr_schedule not in ("plateau", "cosine", "none"):
            raise ValueError(f"lr_schedule must be plateau | cosine | none, got {lr_schedule!r}")
        if mode not in ("features", "images"):
            raise ValueError(f"mode must be features | images, got {mode!r}")
        if not 0.0 <= scheduled_sampling < 1.0:
            raise ValueError(f"scheduled_sampling must be in [0, 1), got {scheduled_sampling}")
        if scheduled_sampling_ramp_epochs < 0:
            raise ValueError(f"scheduled_sampling_ramp_epochs must be >= 0, got {scheduled_sampling_ramp_epochs}")
        if self_critical and self_critical_samples < 2:
            raise ValueError(f"self_critical_samples must be >= 2 (the baseline is the other samples), "
                             f"got {self_critical_samples}")
        parse_reward(self_critical_reward)  # fails early on an unknown term
        if self_critical_xe_weight < 0:
            raise ValueError(f"self_critical_xe_weight must be >= 0, got {self_critical_xe_weight}")
        if self_critical and scheduled_sampling:
            raise ValueError("self_critical already trains on the decoder's own words: drop scheduled_sampling")
        self.decoder = CaptionDecoder(DecoderConfig(
            vocab_size=vocab_size, feature_dim=feature_dim, cell=cell, attention=attention,
            embed_dim=embed_dim, hidden_dim=hidden_dim, attention_dim=attention_dim,
            num_layers=num_layers, dropout=dropout))
        self.encoder = None
        if mode == "images":
            from captioner.model.encoders import build_encoder
            self.encoder = build_encoder(encoder)
            self.encoder.freeze()
            if finetune_blocks:
                self.encoder.trainable_tail(finetune_blocks, train_mode=finetune_train_mode)
        self.vocabulary: Vocabulary | None = None
        self._reward: Reward | None = None  # self_critical only, built from the training references
        self._val_outputs: list[tuple[Tensor, Tensor]] = []

    # ---- data plumbing ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "vocabulary", None) is not None:
            if len(datamodule.vocabulary) != self.hparams.vocab_size:
                raise ValueError("the data's vocabulary does not match the model's vocab_size")
            self.vocabulary = datamodule.vocabulary
        if stage == "fit" and self.hparams.get("self_critical"):
            if getattr(datamodule, "hparams", {}).get("captions_per_epoch") != "one":
                raise TrainingSetupError("self_critical needs data.captions_per_epoch: one (each image once "
                                         "per epoch; its samples are scored against all its captions)")
            self._reward = build_reward(self.hparams.self_critical_reward, datamodule.train_references)
        if stage == "fit" and self.hparams.init_decoder:
            self._load_initial_decoder(self.hparams.init_decoder)

    def _load_initial_decoder(self, path: str) -> None:
        """Start from a trained decoder (see __init__); refuses one that would not fit."""
        from captioner.modelfile import ModelFileError, load_model
        source = load_model(path)
        if source.ensemble:
            raise ModelFileError(f"{path}: init_decoder needs a single decoder, not an ensemble")
        if source.decoder_config != self.decoder.config:
            raise ModelFileError(f"{path}: its decoder ({source.decoder_config.to_dict()}) differs from this "
                                 f"run's model settings ({self.decoder.config.to_dict()})")
        if self.vocabulary is not None and list(source.vocabulary.words) != list(self.vocabulary.words):
            raise ModelFileError(f"{path}: its vocabulary differs from the one built from this run's data")
        if source.encoder.get("name") != self.hparams.encoder or source.encoder.get("finetuned"):
            raise ModelFileError(f"{path}: its decoder was trained on {source.encoder.get('name')} features"
                                 f"{' (fine-tuned)' if source.encoder.get('finetuned') else ''}; this run "
                                 f"uses the stock {self.hparams.encoder}")
        self.decoder.load_state_dict(source.decoder_state)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The vocabulary travels with the weights (plain list of str: safe to load).
        checkpoint["vocabulary"] = list(self.vocabulary.words) if self.vocabulary else None
        checkpoint["encoder_spec"] = self.encoder_spec()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("vocabulary"):
            self.vocabulary = Vocabulary(checkpoint["vocabulary"])

    def encoder_spec(self) -> dict[str, Any]:
        """What the model file records about the encoder (name, preprocessing, fine-tuned)."""
        from captioner.model.encoders import encoder_preprocessing
        name = self.hparams.encoder
        return {"name": name, "preprocessing": encoder_preprocessing(name).to_dict(),
                "finetuned": bool(self.encoder is not None and self.hparams.finetune_blocks)}

    def memory(self, batch: dict[str, Tensor]) -> Memory:
        """Features from the batch (cached) or from the encoder (raw images)."""
        if self.encoder is not None:
            feats = self.encoder(batch["images"])
            grid, pooled = feats.grid, feats.pooled
        else:
            grid, pooled = batch.get("grid"), batch["pooled"]
        return self.decoder.memory(grid.float() if grid is not None else None, pooled.float())

    # ---- training --------------------------------------------------------------------------
    def sample_prob(self) -> float:
        """This epoch's scheduled-sampling probability (see __init__)."""
        p, ramp = self.hparams.scheduled_sampling, self.hparams.get("scheduled_sampling_ramp_epochs", 0)
        return p if ramp <= 0 else p * min(1.0, self.current_epoch / ramp)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if not (self.hparams.get("self_critical") and self.training):
            return self.cross_entropy_loss(batch)
        memory = self.memory(batch)
        total, parts = self_critical_loss(self.decoder, memory, self._reward, batch["index"].tolist(),
                                          self.vocabulary, self.hparams.self_critical_samples,
                                          self.hparams.self_critical_max_length,
                                          mirrored=batch["mirrored"].tolist() if "mirrored" in batch else None)
        xe_weight = self.hparams.get("self_critical_xe_weight", 0.0)
        if xe_weight > 0:
            xe, xe_parts = self.cross_entropy_loss(batch, memory)
            total = total + xe_weight * xe
            parts.update(xe_parts)
        return total, parts

    def cross_entropy_loss(self, batch: dict[str, Tensor],
                           memory: Memory | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher-forced cross-entropy of the batch's captions (+ the attention regularizer)."""
        memory = self.memory(batch) if memory is None else memory
        logits, targets, alphas = self.decoder(memory, batch["captions"], batch["lengths"],
                                               sample_prob=self.sample_prob() if self.training else 0.0)
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)
        parts = {"ce": ce}
        total = ce
        if alphas is not None and self.hparams.alpha_c > 0:
            # Doubly stochastic regularization: every grid cell gets ~1 total attention.
            ds = ((1.0 - alphas.sum(dim=1)) ** 2).mean()
            parts["attention_reg"] = ds
            total = total + self.hparams.alpha_c * ds
        return total, parts

    def on_train_epoch_start(self) -> None:
        # Lightning leaves submodules built in eval mode in eval mode (and restores modes after
        # each validation), so the encoder, built frozen, would never train its opened tail's
        # BatchNorm. Encoder.train() puts exactly the opened blocks in train mode (none with
        # finetune_train_mode=False).
        if self.encoder is not None:
            self.encoder.train()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        total, parts = self.loss(batch)
        bs = batch["captions"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=bs, prog_bar=name == "reward")
        return total

    # ---- validation: greedy decoding + corpus BLEU ------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        result = greedy(self.decoder, self.memory(batch), self.hparams.max_decode_length,
                        no_end_after=self.vocabulary.bad_ending_ids() if self.vocabulary else None)
        self._val_outputs.append((batch["index"], result.tokens[:, 0]))

    def on_validation_epoch_end(self) -> None:
        index, tokens = self._gather_predictions()
        datamodule = self.trainer.datamodule
        references = datamodule.val_references
        keep = torch.unique(index)  # DDP samplers pad with repeats: each dev image counts once
        first = {int(i): row for row, i in reversed(list(enumerate(index.tolist())))}
        hyps = [self.vocabulary.decode(tokens[first[int(i)]].tolist()) for i in keep]
        refs = [references[int(i)] for i in keep]
        scores = bleu_scores(hyps, refs)
        for name, value in scores.items():
            self.log(f"val/{name}", value, prog_bar=name == "bleu4", sync_dist=False, rank_zero_only=False)
        self.log("val/n_images", float(len(keep)))
        for name, value in diversity_scores(hyps).items():
            self.log(f"val/{name}", float(value), sync_dist=False, rank_zero_only=False)

    def _gather_predictions(self) -> tuple[Tensor, Tensor]:
        if not self._val_outputs:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)
        width = self.hparams.max_decode_length
        index = torch.cat([i for i, _ in self._val_outputs])
        tokens = torch.cat([F.pad(t, (0, width - t.shape[1])) for _, t in self._val_outputs])
        if self.trainer.world_size > 1:
            # Equal-length per rank is guaranteed by the distributed sampler's padding.
            index = self.all_gather(index).reshape(-1)
            tokens = self.all_gather(tokens).reshape(-1, width)
        return index.cpu(), tokens.cpu()

    # ---- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = [{"params": [p for p in self.decoder.parameters() if p.requires_grad], "lr": hp.lr}]
        if self.encoder is not None:
            tail = [p for p in self.encoder.parameters() if p.requires_grad]
            if tail:
                groups.append({"params": tail, "lr": hp.encoder_lr})
        optimizer = torch.optim.Adam(groups, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "none":
            return optimizer
        if hp.lr_schedule == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warmup = hp.warmup_steps

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = (step - warmup) / max(1, total - warmup)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=hp.lr_factor,
                                                               patience=hp.lr_patience)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val/bleu4", "interval": "epoch"}}

    # ---- export ----------------------------------------------------------------------------
    def to_model_file(self, training: dict[str, Any] | None = None, scores: dict[str, Any] | None = None):
        from captioner.modelfile import ModelFile
        if self.vocabulary is None:
            raise ValueError("the module has no vocabulary (was it trained or loaded from a checkpoint?)")
        spec = self.encoder_spec()
        encoder_state = None
        if spec["finetuned"]:
            encoder_state = {k: v for k, v in self.encoder.state_dict().items()}
        return ModelFile({k: v.detach().cpu() for k, v in self.decoder.state_dict().items()},
                         self.decoder.config, self.vocabulary, spec, encoder_state,
                         training or {}, scores or {})
