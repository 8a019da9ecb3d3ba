"""A damaged or mismatched feature cache is never used: damaged rows (flipped bytes, NaN,
swapped rows or ids) are refused when read and repaired by extraction; an edited index,
another preprocessing or an older format is refused on open and rebuilt.

Images are generated here; the encoder is a tiny random CNN, so the whole file runs in a few
seconds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captioner.data import writer
from captioner.data.cache import (
    FeatureCache, cache_fingerprint, encoder_fingerprint, index_fingerprints, read_index,
    row_checksums,
)
from captioner.data.extract import build_dataset_cache, ensure_cache, extract_features, pending_rows
from captioner.errors import FeatureCacheError, ImageFeaturesError
from captioner.model.encoders import Encoder, Preprocessing

N = 12
ROW = 16 * 16 * 2  # bytes of one grid row of the tiny encoder (16 cells x 16 channels, float16)


def tiny_encoder(seed: int = 0, preprocessing: Preprocessing | None = None) -> Encoder:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(8, 16, 2, stride=2), nn.ReLU()))
    return Encoder("tiny", body, preprocessing or Preprocessing(size=32), weights_id="random")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def ids_of(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def extract(paths: list[Path], out: Path, encoder: Encoder | None = None) -> FeatureCache:
    return extract_features(encoder or tiny_encoder(), paths, ids_of(paths), out, batch_size=4, workers=0,
                            progress=False)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    extract(images, out)
    return out


@pytest.fixture
def cache_dir(reference, tmp_path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    return out


def data(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("grid.f16", "pooled.f16")}


def poke(path: Path, offset: int, payload: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(payload)


def edit_index(directory: Path, change) -> None:
    path = directory / "index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def refit_fingerprints(index: dict) -> None:
    """What a careful forger does after editing: make the fingerprints agree again."""
    index["encoder_fingerprint"], index["fingerprint"] = index_fingerprints(index)


# ------------------------------------------------------------------------- damaged rows


def test_a_flipped_byte_is_refused_on_read_naming_the_image_then_repaired(images, reference, cache_dir):
    poke(cache_dir / "grid.f16", 5 * ROW + 7, b"\x55")
    cache = FeatureCache.open(cache_dir)  # opening stays cheap: rows are checked when read
    cache.get([0, 1, 2])  # intact rows read fine
    with pytest.raises(FeatureCacheError) as info:
        cache.get([4, 5])
    message = str(info.value)
    assert str(cache_dir) in message and "img05.png" in message and "checksum" in message
    assert "captioner features" in message and "\n" not in message
    assert cache.get([5], grid=False).pooled.shape == (1, 16)  # its pooled row is intact
    assert cache.verify() == [5]
    assert pending_rows(tiny_encoder(), ids_of(images), cache_dir) == 1
    extract(images, cache_dir)
    assert data(cache_dir) == data(reference)  # repaired in the original batch: byte-identical
    assert FeatureCache.open(cache_dir).verify() == []


def test_nan_rows_are_refused_even_with_a_matching_checksum(images, reference, cache_dir):
    nan_row = np.full((16, 16), np.nan, dtype="<f2")
    poke(cache_dir / "grid.f16", 3 * ROW, nan_row.tobytes())
    pooled = np.memmap(cache_dir / "pooled.f16", "<f2", mode="r", shape=(N, 16))

    def forge(index):  # a writer that checksummed the NaN row
        index["checksums"][3] = row_checksums(index["image_ids"][3], nan_row, np.array(pooled[3]))

    edit_index(cache_dir, forge)
    cache = FeatureCache.open(cache_dir)
    with pytest.raises(FeatureCacheError, match=r"img03\.png \(row 3\) are not finite \(NaN or Inf\)"):
        cache.get([2, 3])
    assert cache.verify() == [3]
    extract(images, cache_dir)
    assert data(cache_dir) == data(reference)


def test_swapped_rows_in_a_data_file_are_detected_and_repaired(images, reference, cache_dir):
    grid = bytearray((cache_dir / "grid.f16").read_bytes())
    grid[2 * ROW:3 * ROW], grid[9 * ROW:10 * ROW] = grid[9 * ROW:10 * ROW], grid[2 * ROW:3 * ROW]
    (cache_dir / "grid.f16").write_bytes(bytes(grid))
    cache = FeatureCache.open(cache_dir)
    with pytest.raises(FeatureCacheError, match="img02.png"):
        cache.get([2])
    with pytest.raises(FeatureCacheError, match=r"img09.png .*; run `captioner features`"):
        cache.get([9])
    assert cache.verify() == [2, 9]
    extract(images, cache_dir)
    assert data(cache_dir) == data(reference)


def test_swapped_pooled_rows_fail_a_pooled_only_read(cache_dir):
    pooled = bytearray((cache_dir / "pooled.f16").read_bytes())
    width = 16 * 2
    pooled[0:width], pooled[width:2 * width] = pooled[width:2 * width], pooled[0:width]
    (cache_dir / "pooled.f16").write_bytes(bytes(pooled))
    with pytest.raises(FeatureCacheError, match="img00.png"):
        FeatureCache.open(cache_dir).get([0, 1], grid=False)


def test_two_image_ids_swapped_in_the_index(cache_dir):
    """Plain edit: the stored fingerprint no longer matches the ids, refused on open. With
    the fingerprints forged to agree, the rows' checksums (seeded by their ids) catch it."""
    def swap(index):
        ids = index["image_ids"]
        ids[1], ids[6] = ids[6], ids[1]

    edit_index(cache_dir, swap)
    with pytest.raises(FeatureCacheError, match="corrupt or edited index .*fingerprint"):
        FeatureCache.open(cache_dir)
    edit_index(cache_dir, refit_fingerprints)
    cache = FeatureCache.open(cache_dir)
    assert cache.index_of("img06.png") == 1
    with pytest.raises(FeatureCacheError, match=r"img06\.png \(row 1\) do not match their checksum"):
        cache.get([cache.index_of("img06.png")])
    assert cache.verify() == [1, 6]


# ------------------------------------------------------------------- identity of a cache


def test_other_preprocessing_is_another_cache(images, reference, tmp_path):
    """Same encoder name and weights, other preprocessing: a different fingerprint, so the
    cache is not reused (ensure_cache rebuilds rather than reading the wrong features)."""
    plain = tiny_encoder()
    cropped = tiny_encoder(preprocessing=Preprocessing(size=32, resize="shorter+center-crop"))
    assert plain.name == cropped.name and plain.weights_digest() == cropped.weights_digest()
    assert encoder_fingerprint(plain) != encoder_fingerprint(cropped)
    cache = FeatureCache.open(reference)
    assert cache.matches(plain) and not cache.matches(cropped)
    with pytest.raises(FeatureCacheError, match="stale"):
        FeatureCache.open(reference, cache_fingerprint(cropped, ids_of(images)))
    assert pending_rows(cropped, ids_of(images), reference) == N


def test_edited_preprocessing_in_the_index_is_refused(cache_dir, images):
    edit_index(cache_dir, lambda index: index["preprocessing"].update(resize="shorter+center-crop"))
    with pytest.raises(FeatureCacheError, match="encoder fingerprint does not match"):
        FeatureCache.open(cache_dir)
    assert pending_rows(tiny_encoder(), ids_of(images), cache_dir) == N  # rebuilt, not trusted


@pytest.mark.parametrize("change, message", [
    (lambda index: index.update(format_version=1), "format 1, this version reads format"),
    (lambda index: index.pop("checksums"), "'checksums' missing"),
    (lambda index: index["checksums"].pop(), "checksums do not match the image ids"),
    (lambda index: index["checksums"].__setitem__(4, None), "no valid checksum for row 4"),
    (lambda index: index["checksums"].__setitem__(4, [1, 2**40]), "no valid checksum for row 4"),
    (lambda index: index.update(done=N - 1), "complete flag contradicts"),
    (lambda index: index.update(weights="0" * 64), "encoder fingerprint does not match"),
])
def test_index_problems_are_one_line_naming_the_index(cache_dir, images, reference, change, message):
    edit_index(cache_dir, change)
    with pytest.raises(FeatureCacheError) as info:
        FeatureCache.open(cache_dir)
    text = str(info.value)
    assert text.startswith(str(cache_dir / "index.json")) and message in text
    assert "rebuild it with `captioner features`" in text and "\n" not in text
    extract(images, cache_dir)
    assert data(cache_dir) == data(reference)


def test_truncated_pooled_file_is_rebuilt(images, reference, cache_dir):
    (cache_dir / "pooled.f16").write_bytes((cache_dir / "pooled.f16").read_bytes()[:-1])
    with pytest.raises(FeatureCacheError, match="truncated"):
        FeatureCache.open(cache_dir)
    assert pending_rows(tiny_encoder(), ids_of(images), cache_dir) == N
    extract(images, cache_dir)
    assert data(cache_dir) == data(reference)


# -------------------------------------------------------------------------- extraction


def test_non_finite_features_are_never_written(images, tmp_path, monkeypatch):
    """An encoder output that is not finite is an error for that image: its row is not
    written (zeros, no checksum), the others are, and a re-run retries it."""
    real = writer.encode_batch
    calls = []

    def nan_for_img02(encoder, batch, device):
        feats = real(encoder, batch, device)
        if not calls:
            feats.grid[2] = float("nan")  # row 2 of the first batch is img02.png
        calls.append(1)
        return feats

    monkeypatch.setattr(writer, "encode_batch", nan_for_img02)
    out = tmp_path / "c"
    with pytest.raises(ImageFeaturesError, match=r"1 of 12 images could not be read: .*img02\.png: the "
                                                 r"encoder's features are not finite"):
        extract(images, out)
    index = read_index(out)
    assert [f["row"] for f in index["failed"]] == [2] and index["checksums"][2] is None
    assert not np.memmap(out / "grid.f16", "<f2", mode="r", shape=(N, 16, 16))[2].any()
    with pytest.raises(FeatureCacheError, match="incomplete"):
        FeatureCache.open(out)
    monkeypatch.setattr(writer, "encode_batch", real)
    assert pending_rows(tiny_encoder(), ids_of(images), out) == 1
    assert FeatureCache.open(extract(images, out).directory).verify() == []


def test_features_over_a_damaged_cache_repairs_and_reports(tmp_path, monkeypatch):
    import captioner.model.encoders as encoders

    monkeypatch.setitem(encoders.ENCODERS, "tiny", lambda pretrained=True: tiny_encoder())
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(1)
    lines = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / f"p{i}.png")
        lines.append(json.dumps({"image": f"./p{i}.png", "caption": f"photo {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"

    def build():
        return build_dataset_cache("folder", root, out, encoder="tiny", batch_size=4, workers=0, progress=False)

    first = build()
    assert (first.encoded, first.repaired) == (6, 0) and first.cache.image_ids == [f"p{i}.png" for i in range(6)]
    assert first.seconds > 0
    clean = data(out)
    assert (build().encoded, build().repaired) == (0, 0)
    poke(out / "grid.f16", 4 * ROW, b"\xff\x7f" * 8)  # NaNs in p4's row
    poke(out / "pooled.f16", 1 * 32, b"\x00\x3c")  # a changed value in p1's pooled row
    again = build()
    assert (again.encoded, again.repaired) == (2, 2)
    assert data(out) == clean


def test_training_refuses_a_damaged_row_and_repairs_its_own_cache(tmp_path, monkeypatch):
    """The data module never hands a damaged row to the model (a NaN row would make every
    weight NaN); setting it up again repairs the cache it built."""
    import captioner.model.encoders as encoders
    from captioner.data.datamodule import CaptionDataModule

    monkeypatch.setitem(encoders.ENCODERS, "tiny", lambda pretrained=True: tiny_encoder())
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(2)
    lines = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / f"q{i}.png")
        lines.append(json.dumps({"image": f"q{i}.png", "caption": f"a dog number {i}",
                                 "split": "dev" if i == 4 else "train"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")

    def datamodule() -> CaptionDataModule:
        dm = CaptionDataModule(dataset="folder", data_root=str(root), feature_cache=str(tmp_path / "cache"),
                               encoder="tiny", min_word_freq=1, batch_size=8)
        dm.setup("fit")
        return dm

    dm = datamodule()
    batch = next(iter(dm.train_dataloader()))
    assert batch["grid"].shape == (4, 16, 16) and "mirrored" not in batch
    clean = data(tmp_path / "cache")
    row = dm._cache.index_of("q2.png")
    poke(tmp_path / "cache" / "grid.f16", row * ROW, b"\xff\x7f" * 4)
    with pytest.raises(FeatureCacheError, match=r"q2\.png \(row \d\) do not match their checksum"):
        next(iter(dm.train_dataloader()))
    datamodule()
    assert data(tmp_path / "cache") == clean


def test_a_covering_cache_of_more_images_is_used_as_is(images, reference, tmp_path, monkeypatch):
    import captioner.model.encoders as encoders

    monkeypatch.setitem(encoders.ENCODERS, "tiny", lambda pretrained=True: tiny_encoder())
    out = tmp_path / "c"
    shutil.copytree(reference, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    subset = images[::2]
    cache = ensure_cache(out, "tiny", subset, ids_of(subset), workers=0, progress=False)
    assert cache.fingerprint == FeatureCache.open(reference).fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
