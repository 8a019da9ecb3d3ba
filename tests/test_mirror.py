"""Mirror augmentation of cached features: the mirrored preprocessing, the left/right swap of
captions, and the data module's training batches that read a random half of their images
from the mirrored cache (validation never does)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data.datamodule import CaptionDataModule
from captioner.data.features import FeatureCache, StaleCacheError, encoder_fingerprint, extract_features
from captioner.data.sources import read_dataset
from captioner.model.encoders import Preprocessing, build_encoder
from captioner.text import Vocabulary, mirror_words, tokenize

N_IMAGES = 6
SIDES = ("a dog runs to the left of a man", "a man on the right", "a dog and a man",
         "a dog on the left and a man on the right", "two animals")


def test_mirrored_preprocessing_flips_after_resizing_and_keeps_plain_dicts_unchanged():
    plain = Preprocessing(size=32, resize="shorter+center-crop")
    mirrored = dataclasses.replace(plain, mirror=True)
    assert "mirror" not in plain.to_dict()  # caches and model files from before `mirror` match
    assert mirrored.to_dict()["mirror"] is True
    assert Preprocessing.from_dict(mirrored.to_dict()) == mirrored
    assert Preprocessing.from_dict(plain.to_dict()) == plain
    pixels = np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert torch.equal(mirrored.transform()(image), plain.transform()(image).flip(-1))


def test_mirror_words_and_ids_swap_left_and_right_only():
    assert mirror_words("a dog on the left of a man on the right".split()) == \
        "a dog on the right of a man on the left".split()
    vocab = Vocabulary.build(SIDES, min_freq=1)
    swap = vocab.mirror_ids()
    assert [swap[i] for i in vocab.encode("a dog on the left")] == vocab.encode("a dog on the right")
    assert swap[Vocabulary.end_id] == Vocabulary.end_id and len(swap) == len(vocab)
    only_left = Vocabulary.build(["a dog on the left"], min_freq=1)
    assert only_left.mirror_ids() == list(range(len(only_left)))  # no counterpart: kept


@pytest.fixture(scope="module")
def caches(flickr8k_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Plain and mirrored EfficientNet-Lite0 caches of the first training images."""
    tmp = tmp_path_factory.mktemp("mirror")
    records = [r for r in read_dataset("flickr8k", flickr8k_root, splits=["train"])][:N_IMAGES]
    paths, ids = [r.path for r in records], [r.image_id for r in records]
    encoder = build_encoder("efficientnet-lite0")
    plain_fp = encoder_fingerprint(encoder)
    extract_features(encoder, paths, ids, tmp / "plain", batch_size=8, workers=0, progress=False)
    encoder.preprocessing = dataclasses.replace(encoder.preprocessing, mirror=True)
    assert encoder_fingerprint(encoder) != plain_fp
    extract_features(encoder, paths, ids, tmp / "mirror", batch_size=8, workers=0, progress=False)
    return tmp / "plain", tmp / "mirror"


def datamodule(root: Path, plain: Path, mirror: Path | None, **kwargs) -> CaptionDataModule:
    return CaptionDataModule(data_root=str(root), feature_cache=str(plain),
                             mirror_cache=None if mirror is None else str(mirror), val_split="train",
                             train_limit=N_IMAGES, val_limit=N_IMAGES, min_word_freq=1, batch_size=7, **kwargs)


def with_sides_captions(dm: CaptionDataModule) -> CaptionDataModule:
    """Image 0's captions replaced by ones that say left and right, so the swap shows."""
    dm.train_records[0] = dataclasses.replace(dm.train_records[0], captions=SIDES)
    dm.vocabulary = Vocabulary.build([c for r in dm.train_records for c in r.captions], min_freq=1)
    return dm


def test_training_batches_read_a_random_half_mirrored_with_sides_swapped(flickr8k_root, caches):
    plain_dir, mirror_dir = caches
    dm = with_sides_captions(datamodule(flickr8k_root, plain_dir, mirror_dir))
    dm.setup("fit")
    plain, mirror = FeatureCache.open(plain_dir), FeatureCache.open(mirror_dir)
    batches = list(dm.train_dataloader())
    flags = torch.cat([b["mirrored"] for b in batches])
    assert len(flags) == 5 * N_IMAGES and 0 < int(flags.sum()) < len(flags)
    swapped_sides = 0
    for batch in batches:
        for row, (position, flipped) in enumerate(zip(batch["index"].tolist(), batch["mirrored"].tolist())):
            record = dm.train_records[position]
            source = mirror if flipped else plain
            want = source.get([source.index_of(record.image_id)])
            assert torch.equal(batch["pooled"][row], want.pooled[0])
            assert torch.equal(batch["grid"][row], want.grid[0])
            words = dm.vocabulary.decode(batch["captions"][row].tolist()).split()
            original = mirror_words(words) if flipped else words
            assert original in [tokenize(c) for c in record.captions]
            swapped_sides += flipped and original != words
    assert swapped_sides > 0  # some of image 0's captions were drawn mirrored (seed 0) and said the other side
    again = torch.cat([b["mirrored"] for b in dm.train_dataloader()])
    assert torch.equal(again, flags)  # the same epoch draws the same rows (seeded per epoch)
    val = next(iter(dm.val_dataloader()))
    assert "mirrored" not in val
    assert torch.equal(val["pooled"], plain.get([plain.index_of(r.image_id) for r in dm.val_records[:7]]).pooled)


def test_a_cache_that_is_not_the_mirrored_twin_is_refused(flickr8k_root, caches):
    plain_dir, _ = caches
    dm = datamodule(flickr8k_root, plain_dir, plain_dir)
    with pytest.raises(StaleCacheError, match="not the mirrored twin of .*captioner features --mirror"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="data.mirror_cache needs data.mode=features"):
        datamodule(flickr8k_root, plain_dir, plain_dir, mode="images")
