"""LightningModule: the math of training a captioner. The Trainer owns the loop, the
DataModule the data, callbacks the rest (encoder fine-tuning is `EncoderFinetuning`).

Two modes, linked from the data: `features` (batches carry a frozen encoder's cached
Features: the fast default) and `images` (batches carry pixels and the encoder runs in the
loop, so `EncoderFinetuning` can open its last blocks). Two objectives: cross-entropy, or
self-critical training on a caption metric (`self_critical`). Validation decodes greedily (no
teacher forcing) and logs corpus BLEU-1..4 over every dev image exactly once, also under DDP.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.nn import functional as F

from captioner.errors import ModelFileError, TrainingError
from captioner.metrics import bleu_scores, diversity_scores
from captioner.model.decoder import CaptionDecoder, Memory
from captioner.model.search import greedy
from captioner.model.self_critical import Reward, build_reward, self_critical_loss
from captioner.model.settings import DecoderSettings, FinetuneConfig, OptimizationConfig, SelfCriticalConfig
from captioner.text import Vocabulary

__all__ = ["CaptioningModule", "DecoderSettings", "FinetuneConfig", "OptimizationConfig", "SelfCriticalConfig"]


def _as(kind: type, value: Any) -> Any:
    """A settings dataclass from itself or from its dict (as a checkpoint stores it)."""
    return kind(**value) if isinstance(value, dict) else value


class CaptioningModule(pl.LightningModule):
    def __init__(
        self,
        vocab_size: int = 0,
        feature_dim: int = 0,
        decoder: DecoderSettings = DecoderSettings(),
        optimization: OptimizationConfig = OptimizationConfig(),
        self_critical: SelfCriticalConfig | None = None,
        init_decoder: str | None = None,
        finetune: FinetuneConfig | None = None,
        max_decode_length: int = 30,
        mode: str = "features",
        encoder: str = "efficientnet-lite0",
    ) -> None:
        """`vocab_size`, `feature_dim`, `mode` and `encoder` are linked from the DataModule.

        `init_decoder`: a model file whose decoder weights this run starts from (self-critical
        training from a converged cross-entropy decoder, or encoder fine-tuning); its decoder,
        vocabulary and encoder must match this run's. A resumed run (--ckpt_path) takes its
        weights from the checkpoint instead. `finetune`: open the encoder's last blocks
        (`EncoderFinetuning`; needs data.mode: images)."""
        super().__init__()
        decoder, optimization = _as(DecoderSettings, decoder), _as(OptimizationConfig, optimization)
        self_critical, finetune = _as(SelfCriticalConfig, self_critical), _as(FinetuneConfig, finetune)
        # Checkpoints keep the settings as plain dicts: the weights-only unpickler that reads
        # them back refuses any class.
        self.save_hyperparameters({"vocab_size": vocab_size, "feature_dim": feature_dim, "decoder": asdict(decoder),
                                   "optimization": asdict(optimization),
                                   "self_critical": None if self_critical is None else asdict(self_critical),
                                   "init_decoder": init_decoder,
                                   "finetune": None if finetune is None else asdict(finetune),
                                   "max_decode_length": max_decode_length, "mode": mode, "encoder": encoder})
        if vocab_size < 5 or feature_dim < 1:
            raise TrainingError("vocab_size and feature_dim must come from the data (link data.vocab_size / "
                                f"data.feature_dim); got vocab_size={vocab_size}, feature_dim={feature_dim}")
        if mode not in ("features", "images"):
            raise TrainingError(f"mode must be features | images, got {mode!r}")
        if finetune is not None and mode != "images":
            raise TrainingError("model.finetune needs data.mode: images (the encoder runs in the training loop)")
        self.settings = optimization
        self.self_critical = self_critical
        self.finetune = finetune
        self.decoder = CaptionDecoder(decoder.config(vocab_size, feature_dim))
        self.encoder = None
        if mode == "images":  # frozen until EncoderFinetuning opens its tail
            from captioner.model.encoders import build_encoder
            self.encoder = build_encoder(encoder)
        self.encoder_trained = False  # set by EncoderFinetuning; travels in checkpoints
        self.vocabulary: Vocabulary | None = None
        self._reward: Reward | None = None  # self-critical only, built from the training references
        self._val_outputs: list[tuple[Tensor, Tensor]] = []

    def configure_callbacks(self) -> list[pl.Callback]:
        """Encoder fine-tuning travels with the model's config, beside the trainer's callbacks."""
        if self.finetune is None:
            return []
        from captioner.model.finetune import EncoderFinetuning
        return [EncoderFinetuning(**asdict(self.finetune))]

    # ---- data plumbing ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "vocabulary", None) is not None:
            if len(datamodule.vocabulary) != self.hparams.vocab_size:
                raise TrainingError("the data's vocabulary does not match the model's vocab_size")
            self.vocabulary = datamodule.vocabulary
        if stage == "fit" and self.self_critical is not None:
            if getattr(datamodule, "hparams", {}).get("captions_per_epoch") != "one":
                raise TrainingError("self_critical needs data.captions_per_epoch: one (each image once per "
                                    "epoch; its samples are scored against all its captions)")
            self._reward = build_reward(self.self_critical.reward, datamodule.train_references)
        if stage == "fit" and self.hparams.init_decoder:
            self._load_initial_decoder(self.hparams.init_decoder)

    def _load_initial_decoder(self, path: str) -> None:
        """Start from a trained decoder (see __init__); refuses one that would not fit."""
        from captioner.modelfile import load_model
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
        # The vocabulary travels with the weights (a plain list of str: safe to load).
        checkpoint["vocabulary"] = list(self.vocabulary.words) if self.vocabulary else None
        checkpoint["encoder_spec"] = self.encoder_spec()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("vocabulary"):
            self.vocabulary = Vocabulary(checkpoint["vocabulary"])
        self.encoder_trained = bool((checkpoint.get("encoder_spec") or {}).get("finetuned", False))

    def encoder_spec(self) -> dict[str, Any]:
        """What the model file records about the encoder (name, preprocessing, fine-tuned)."""
        from captioner.model.encoders import encoder_preprocessing
        name = self.hparams.encoder
        return {"name": name, "preprocessing": encoder_preprocessing(name).to_dict(),
                "finetuned": bool(self.encoder is not None and self.encoder_trained)}

    def memory(self, batch: dict[str, Tensor]) -> Memory:
        """Features from the batch (cached) or from the encoder (raw images)."""
        if self.encoder is not None:
            feats = self.encoder(batch["images"])
            grid, pooled = feats.grid, feats.pooled
        else:
            grid, pooled = batch.get("grid"), batch["pooled"]
        return self.decoder.memory(grid.float() if grid is not None else None, pooled.float())

    # ---- training --------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if self.self_critical is None or not self.training:
            return self.cross_entropy_loss(batch)
        sc = self.self_critical
        memory = self.memory(batch)
        total, parts = self_critical_loss(self.decoder, memory, self._reward, batch["index"].tolist(),
                                          self.vocabulary, sc.samples, sc.max_length)
        if sc.xe_weight > 0:
            xe, xe_parts = self.cross_entropy_loss(batch, memory)
            total = total + sc.xe_weight * xe
            parts.update(xe_parts)
        return total, parts

    def cross_entropy_loss(self, batch: dict[str, Tensor],
                           memory: Memory | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher-forced cross-entropy of the batch's captions (+ the attention regularizer)."""
        memory = self.memory(batch) if memory is None else memory
        logits, targets, alphas = self.decoder(memory, batch["captions"], batch["lengths"])
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.settings.label_smoothing)
        parts, total = {"ce": ce}, ce
        if alphas is not None and self.settings.alpha_c > 0:
            ds = ((1.0 - alphas.sum(dim=1)) ** 2).mean()  # doubly stochastic: ~1 attention per cell
            parts["attention_reg"] = ds
            total = total + self.settings.alpha_c * ds
        return total, parts

    def on_train_epoch_start(self) -> None:
        # Lightning restores submodules' modes after validation; Encoder.train() puts exactly
        # its opened blocks in train mode (none while frozen).
        if self.encoder is not None:
            self.encoder.train()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        total, parts = self.loss(batch)
        if not torch.isfinite(total):
            # A NaN feature or a diverged run: stop now rather than train on, and later export, NaN.
            raise TrainingError(f"non-finite training loss ({total.detach().item()}) at epoch {self.current_epoch}, "
                                f"step {self.global_step}: check the features and lower model.optimization.lr")
        bs = batch["captions"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=bs, prog_bar=name == "reward")
        return total

    def on_train_epoch_end(self) -> None:
        # A finite loss on the last step can still leave non-finite weights behind it.
        bad = [name for name, p in self.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(f"non-finite weights after epoch {self.current_epoch} ({', '.join(bad[:3])})")

    # ---- validation: greedy decoding + corpus BLEU ------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        result = greedy(self.decoder, self.memory(batch), self.hparams.max_decode_length,
                        no_end_after=self.vocabulary.bad_ending_ids() if self.vocabulary else None)
        self._val_outputs.append((batch["index"], result.tokens[:, 0]))

    def on_validation_epoch_end(self) -> None:
        index, tokens = self._gather_predictions()
        references = self.trainer.datamodule.val_references
        keep = torch.unique(index)  # DDP samplers pad with repeats: each dev image counts once
        first = {int(i): row for row, i in reversed(list(enumerate(index.tolist())))}
        hyps = [self.vocabulary.decode(tokens[first[int(i)]].tolist()) for i in keep]
        refs = [references[int(i)] for i in keep]
        for name, value in bleu_scores(hyps, refs).items():
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
        if self.trainer.world_size > 1:  # equal length per rank: the distributed sampler pads
            index = self.all_gather(index).reshape(-1)
            tokens = self.all_gather(tokens).reshape(-1, width)
        return index.cpu(), tokens.cpu()

    # ---- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.settings
        params = [p for p in self.decoder.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam([{"params": params, "lr": hp.lr}], weight_decay=hp.weight_decay)
        if hp.lr_schedule == "none":
            return optimizer
        if hp.lr_schedule == "cosine":
            total, warmup = max(1, int(self.trainer.estimated_stepping_batches)), hp.warmup_steps

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

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
            raise TrainingError("the module has no vocabulary (was it trained or loaded from a checkpoint?)")
        spec = self.encoder_spec()
        encoder_state = dict(self.encoder.state_dict()) if spec["finetuned"] else None
        return ModelFile({k: v.detach().cpu() for k, v in self.decoder.state_dict().items()},
                         self.decoder.config, self.vocabulary, spec, encoder_state, training or {}, scores or {})
