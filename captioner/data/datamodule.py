"""LightningDataModule: records -> vocabulary -> batches, in two modes.

`features` (default): batches carry the frozen encoder's cached Features, read from the
FeatureCache a batch at a time (a COCO-sized cache never has to fit in RAM) and checked as
they are read, so a damaged row stops training with its name instead of poisoning the
weights; setting up again repairs a cache this module built (`extract.ensure_cache`).
`images`: batches carry preprocessed pixels (with augmentation for training), for
fine-tuning the encoder.

Training samples are (image, caption) pairs: every caption of every image per epoch
(`captions_per_epoch: all`) or one random caption per image (`one`); a training batch also
carries each image's position in `train_references` (self-critical training scores against
them). Validation batches are
one row per image with its index into `val_references`, so BLEU sees each image once.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from captioner.data.sources import Record, read_dataset
from captioner.errors import DatasetError
from captioner.text import Vocabulary, tokenize

if TYPE_CHECKING:
    from captioner.data.cache import FeatureCache


def pad_captions(captions: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-pad id lists with <pad>; returns captions [B,T] and lengths [B]."""
    lengths = torch.tensor([len(c) for c in captions], dtype=torch.long)
    out = torch.full((len(captions), int(lengths.max())), Vocabulary.pad_id, dtype=torch.long)
    for i, c in enumerate(captions):
        out[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return out, lengths


class CaptionPairs(Dataset):
    """(image position, caption ids) pairs; `one` mode draws a caption per image each time
    (torch's RNG: seeded by seed_everything, and per worker by the DataLoader)."""

    def __init__(self, encoded: list[list[list[int]]], per_epoch: str) -> None:
        self.encoded, self.per_epoch = encoded, per_epoch
        self.pairs = [(i, j) for i, caps in enumerate(encoded) for j in range(len(caps))]

    def __len__(self) -> int:
        return len(self.pairs) if self.per_epoch == "all" else len(self.encoded)

    def caption_length(self, k: int) -> int:
        """Length of item k (for `one`, the longest caption of the image)."""
        if self.per_epoch == "all":
            i, j = self.pairs[k]
            return len(self.encoded[i][j])
        return max(len(c) for c in self.encoded[k])

    def __getitem__(self, k: int) -> tuple[int, list[int]]:
        if self.per_epoch == "all":
            i, j = self.pairs[k]
        else:
            i = k
            j = int(torch.randint(len(self.encoded[k]), ()))
        return i, self.encoded[i][j]


class LengthBucketSampler(Sampler[int]):
    """Shuffled order in which each run of `batch_size` indices has similar caption lengths.

    Indices are shuffled, cut into pools of `pool_batches` batches, each pool sorted by
    length and cut into batches, and the batches shuffled: batches stay random across the
    epoch while padding inside a batch nearly vanishes (the padded RNN kernel is fastest).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, pool_batches: int = 50) -> None:
        self.lengths, self.batch_size, self.seed, self.pool = list(lengths), batch_size, seed, pool_batches
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), span):
            pool = sorted(order[start:start + span], key=self.lengths.__getitem__)
            batches += [pool[i:i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        rng.shuffle(batches)
        self.epoch += 1  # a fresh order next epoch even without set_epoch
        return iter([i for batch in batches for i in batch])


class ImageIndex(Dataset):
    """Validation/test: one item per image."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> int:
        return k


class CaptionDataModule(pl.LightningDataModule):
    def __init__(
        self,
        dataset: str = "flickr8k",
        data_root: str = "../shared/datasets/flickr8k",
        mode: str = "features",
        feature_cache: str | None = "cache/flickr8k-lite0",
        encoder: str = "efficientnet-lite0",
        load_grid: bool = True,
        train_split: str = "train",
        val_split: str = "dev",
        min_word_freq: int = 5,
        max_caption_length: int = 40,
        captions_per_epoch: str = "all",
        batch_size: int = 64,
        val_batch_size: int = 100,
        num_workers: int = 0,
        train_limit: int | None = None,
        val_limit: int | None = None,
        skip_missing: bool = False,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        """Reads the dataset and builds the vocabulary now, so LightningCLI can link
        `vocab_size` and `feature_dim` into the model before anything is trained."""
        super().__init__()
        if mode not in ("features", "images"):
            raise ValueError(f"data.mode must be features | images, got {mode!r}")
        if captions_per_epoch not in ("all", "one"):
            raise ValueError(f"captions_per_epoch must be all | one, got {captions_per_epoch!r}")
        if mode == "features" and not feature_cache:
            raise ValueError("data.mode=features needs data.feature_cache (a directory)")
        self.save_hyperparameters()
        records = read_dataset(dataset, data_root, splits=[train_split, val_split], skip_missing=skip_missing)
        self.train_records = [r for r in records if r.split == train_split][:train_limit]
        self.val_records = [r for r in records if r.split == val_split][:val_limit]
        for split, recs in ((train_split, self.train_records), (val_split, self.val_records)):
            if not recs:
                raise DatasetError(f"{data_root}: no images in split {split!r} of dataset {dataset!r}")
        self.vocabulary = Vocabulary.build((c for r in self.train_records for c in r.captions), min_word_freq)
        self.val_references = [list(r.captions) for r in self.val_records]
        self._cache = None
        self._preprocessing = None

    @functools.cached_property
    def train_references(self) -> list[list[list[str]]]:
        """Tokenized captions of train image i at row i, for training on a metric
        (self-critical); built on first use, so cross-entropy runs never pay for it."""
        return [[tokenize(c) for c in r.captions] for r in self.train_records]

    # Linked into the model by LightningCLI.
    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    @property
    def feature_dim(self) -> int:
        from captioner.model.encoders import encoder_feature_dim
        return encoder_feature_dim(self.hparams.encoder)

    def _encode(self, records: list[Record]) -> list[list[list[int]]]:
        limit = self.hparams.max_caption_length
        out = []
        for r in records:
            caps = [self.vocabulary.encode(c)[: limit + 1] for c in r.captions]
            out.append([c if c[-1] == Vocabulary.end_id else c[:limit] + [Vocabulary.end_id] for c in caps])
        return out

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if hp.mode == "features":
            self._cache = self._open_or_build_cache()
            self._train_rows = np.array([self._cache.index_of(r.image_id) for r in self.train_records])
            self._val_rows = np.array([self._cache.index_of(r.image_id) for r in self.val_records])
        else:
            from captioner.model.encoders import encoder_preprocessing
            self._preprocessing = encoder_preprocessing(hp.encoder)
        self.train_set = CaptionPairs(self._encode(self.train_records), hp.captions_per_epoch)
        self.val_set = ImageIndex(len(self.val_records))

    def _open_or_build_cache(self) -> FeatureCache:
        """Use the cache when it matches (encoder fingerprint, image list); else build it."""
        from captioner.data.extract import ensure_cache
        records = {r.image_id: r.path for r in self.train_records + self.val_records}  # val may be train
        return ensure_cache(self.hparams.feature_cache, self.hparams.encoder,
                            list(records.values()), list(records),
                            workers=self.hparams.num_workers)

    # ---- batches ---------------------------------------------------------------------------
    def _features(self, rows: np.ndarray) -> dict[str, Tensor]:
        feats = self._cache.get(rows, grid=self.hparams.load_grid)
        batch = {"pooled": feats.pooled}
        if self.hparams.load_grid:
            batch["grid"] = feats.grid
        return batch

    def _images(self, records: list[Record], train: bool) -> dict[str, Tensor]:
        from captioner.images import load_image
        transform = self._preprocessing.transform(augment=train and self.hparams.augment)
        return {"images": torch.stack([transform(load_image(r.path, draft_size=self._preprocessing.draft_size))
                                       for r in records])}

    def _collate_train(self, items: list[tuple[int, list[int]]]) -> dict[str, Tensor]:
        positions = [i for i, _ in items]
        captions, lengths = pad_captions([c for _, c in items])
        if self.hparams.mode == "features":
            batch = self._features(self._train_rows[positions])
        else:
            batch = self._images([self.train_records[i] for i in positions], train=True)
        batch.update(captions=captions, lengths=lengths, index=torch.tensor(positions, dtype=torch.long))
        return batch

    def _collate_val(self, positions: list[int]) -> dict[str, Tensor]:
        batch = (self._features(self._val_rows[positions]) if self.hparams.mode == "features"
                 else self._images([self.val_records[i] for i in positions], train=False))
        batch["index"] = torch.tensor(positions, dtype=torch.long)
        return batch

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer else 0
        sampler = LengthBucketSampler([self.train_set.caption_length(k) for k in range(len(self.train_set))],
                                      self.hparams.batch_size, seed=self.hparams.seed)
        sampler.set_epoch(epoch)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=self._collate_train, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.val_batch_size, shuffle=False,
                          collate_fn=self._collate_val, num_workers=self.hparams.num_workers)

    def state_dict(self) -> dict[str, Any]:
        return {"vocabulary": self.vocabulary.words}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A resumed run must keep the vocabulary its weights were trained with.
        words = state.get("vocabulary")
        if words and words != self.vocabulary.words:
            raise ValueError("the data's vocabulary differs from the checkpoint's: resume with the same data config")
