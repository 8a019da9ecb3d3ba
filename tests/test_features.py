"""FeatureCache: round trip, read-only memmaps, resume, stale/truncated/corrupt detection,
bad images, and the `captioner features` command, on a small real slice of Flickr8k.

Most tests use a tiny random CNN (fast); one runs the real efficientnet-lite0. Damaged and
edited caches are test_cache_damage.py's."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from captioner.data import extract as extraction
from captioner.data import writer
from captioner.data.cache import FeatureCache, cache_fingerprint
from captioner.data.extract import ensure_cache, extract_features, pending_rows
from captioner.errors import FeatureCacheError, ImageFeaturesError
from captioner.model.encoders import Encoder, Preprocessing, build_encoder

N_IMAGES = 16
FILES = ("grid.f16", "pooled.f16", "index.json")


def tiny_encoder(seed: int = 0) -> Encoder:
    """32x32 input -> [B, 16 cells, 16 channels]; deterministic for a given seed."""
    torch.manual_seed(seed)
    body = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 2, stride=2), nn.ReLU()),
    )
    return Encoder("tiny", body, Preprocessing(size=32), weights_id="random")


@pytest.fixture(scope="module")
def images(flickr8k_root: Path) -> list[Path]:
    return sorted((flickr8k_root / "images").glob("*.jpg"))[:N_IMAGES]


def ids_of(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def extract(paths: list[Path], out: Path, encoder: Encoder | None = None, **kwargs) -> FeatureCache:
    options = {"batch_size": 4, "workers": 0, "progress": False, **kwargs}
    return extract_features(encoder or tiny_encoder(), paths, ids_of(paths), out, **options)


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("grid.f16", "pooled.f16")}


@pytest.fixture(scope="module")
def reference(images: list[Path], tmp_path_factory) -> Path:
    """An uninterrupted run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    extract(images, out)
    return out


# ------------------------------------------------------------------------------ round trip


def test_round_trip_matches_the_encoder(images, reference):
    cache = FeatureCache.open(reference, cache_fingerprint(tiny_encoder(), ids_of(images)))
    assert len(cache) == N_IMAGES and cache.encoder == "tiny"
    assert cache.index_of(images[5].name) == 5 and images[5].name in cache
    feats = cache.get([5, 2])
    assert feats.grid.shape == (2, 16, 16) and feats.pooled.shape == (2, 16)
    assert feats.grid.dtype == feats.pooled.dtype == torch.float32
    assert cache.get([1], grid=False).grid is None

    from captioner.images import load_image

    pre = cache.preprocessing
    x = torch.stack([pre.transform()(load_image(images[i], draft_size=pre.draft_size)) for i in (5, 2)])
    with torch.inference_mode():
        direct = tiny_encoder()(x)
    torch.testing.assert_close(feats.grid, direct.grid, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cache.pooled(2), direct.pooled[1], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cache.grid(5), feats.grid[0])
    with pytest.raises(KeyError, match="not in the feature cache"):
        cache.index_of("nope.jpg")


def test_grid_reads_equal_the_memmap_in_any_order_and_after_pickling(reference):
    """get() reads grid rows with preadv (no pages mapped into the process); same values."""
    import pickle

    cache = FeatureCache.open(reference)
    rows = [7, 0, 7, N_IMAGES - 1, 3]
    expected = torch.from_numpy(np.asarray(cache.grid_array[rows], dtype=np.float32))
    torch.testing.assert_close(cache.get(rows).grid, expected, rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(cache))  # what a spawned DataLoader worker gets
    torch.testing.assert_close(clone.get(rows).grid, expected, rtol=0, atol=0)
    assert cache.get([]).grid.shape == (0, 16, 16)
    with pytest.raises(IndexError, match="out of"):
        cache.get([N_IMAGES])


def test_cache_is_a_read_only_memmap(reference):
    cache = FeatureCache.open(reference)
    for array in (cache.grid_array, cache.pooled_array):
        assert isinstance(array, np.memmap) and array.mode == "r"
        assert not array.flags.writeable
    index = json.loads((reference / "index.json").read_text())
    assert index["complete"] and index["done"] == N_IMAGES and index["failed"] == []
    assert index["grid_shape"] == [N_IMAGES, 16, 16] and index["dtype"] == "<f2"
    assert (reference / "grid.f16").stat().st_size == N_IMAGES * 16 * 16 * 2
    assert sorted(p.name for p in reference.iterdir()) == sorted(FILES)  # no temp or lock files


def test_up_to_date_cache_is_reused(images, reference, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(reference, out)
    assert pending_rows(tiny_encoder(), ids_of(images), out) == 0
    before = (out / "grid.f16").stat().st_mtime_ns
    extract(images, out)
    assert (out / "grid.f16").stat().st_mtime_ns == before


def test_real_lite0_with_worker_processes(images, tmp_path):
    encoder = build_encoder("efficientnet-lite0")
    cache = extract_features(encoder, images, ids_of(images), tmp_path, batch_size=8, workers=2,
                             progress=False)
    feats = cache.get(range(N_IMAGES))
    assert feats.grid.shape == (N_IMAGES, 49, 1280) and feats.pooled.shape == (N_IMAGES, 1280)
    torch.testing.assert_close(feats.pooled, feats.grid.mean(dim=1), atol=1e-2, rtol=1e-2)
    assert cache.preprocessing == encoder.preprocessing
    assert not encoder.training  # the encoder comes back as it went in


# ---------------------------------------------------------------------------------- resume


class Killed(Exception):
    pass


def test_resume_after_interruption_is_byte_identical(images, reference, tmp_path, monkeypatch):
    real_write_index = writer.write_index
    calls = {"n": 0}

    def dies_on_third_batch(directory, index):
        calls["n"] += 1
        if calls["n"] == 4:  # 1: fresh index; 2, 3: two batches committed; 4: killed
            raise Killed
        real_write_index(directory, index)

    monkeypatch.setattr(writer, "write_index", dies_on_third_batch)
    with pytest.raises(Killed):
        extract(images, tmp_path)
    monkeypatch.setattr(writer, "write_index", real_write_index)

    index = json.loads((tmp_path / "index.json").read_text())
    assert index["done"] == 8 and not index["complete"]
    with pytest.raises(FeatureCacheError, match="incomplete"):
        FeatureCache.open(tmp_path)
    assert pending_rows(tiny_encoder(), ids_of(images), tmp_path) == N_IMAGES - 8

    extract(images, tmp_path)
    assert file_bytes(tmp_path) == file_bytes(reference)
    assert FeatureCache.open(tmp_path).index["done"] == N_IMAGES


# ------------------------------------------------------------------ stale / truncated / corrupt


def test_stale_fingerprint_is_refused_and_rebuilt(images, reference, tmp_path):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    other = tiny_encoder(seed=1)  # same architecture, different weights
    with pytest.raises(FeatureCacheError, match="stale"):
        FeatureCache.open(tmp_path, cache_fingerprint(other, ids_of(images)))
    with pytest.raises(FeatureCacheError, match="stale"):  # same weights, different image list
        FeatureCache.open(tmp_path, cache_fingerprint(tiny_encoder(), ids_of(images)[::-1]))

    rebuilt = extract(images, tmp_path, encoder=other)
    assert rebuilt.fingerprint == cache_fingerprint(other, ids_of(images))
    assert file_bytes(tmp_path) != file_bytes(reference)
    extract(images, tmp_path)  # and back
    assert file_bytes(tmp_path) == file_bytes(reference)


def test_truncated_grid_is_refused_and_rebuilt(images, reference, tmp_path):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    grid = tmp_path / "grid.f16"
    grid.write_bytes(grid.read_bytes()[:-100])
    with pytest.raises(FeatureCacheError, match="truncated"):
        FeatureCache.open(tmp_path)
    assert pending_rows(tiny_encoder(), ids_of(images), tmp_path) == N_IMAGES
    extract(images, tmp_path)
    assert file_bytes(tmp_path) == file_bytes(reference)


@pytest.mark.parametrize("damage", [
    lambda index: b"\x00garbage{",
    lambda index: json.dumps({k: v for k, v in index.items() if k != "grid_shape"}).encode(),
    lambda index: json.dumps({**index, "done": 10**6}).encode(),
    lambda index: json.dumps({**index, "format_version": 99}).encode(),
])
def test_corrupt_index_is_refused_and_rebuilt(images, reference, tmp_path, damage):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "index.json"
    path.write_bytes(damage(json.loads(path.read_text())))
    with pytest.raises(FeatureCacheError):
        FeatureCache.open(tmp_path)
    extract(images, tmp_path)
    assert file_bytes(tmp_path) == file_bytes(reference)
    FeatureCache.open(tmp_path, cache_fingerprint(tiny_encoder(), ids_of(images)))


def test_missing_directory_is_not_a_cache(tmp_path):
    with pytest.raises(FeatureCacheError, match="not a feature cache"):
        FeatureCache.open(tmp_path / "nothing")


# ------------------------------------------------------------------------------ bad images


def test_bad_images_are_named_recorded_and_retried(images, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [Path(shutil.copy(p, folder)) for p in images[:6]]
    paths[1].write_bytes(b"this is not a JPEG")
    paths[4].write_bytes(images[4].read_bytes()[:2000])  # truncated download
    out = tmp_path / "cache"

    with pytest.raises(ImageFeaturesError) as info:
        extract(paths, out)
    message = str(info.value)
    assert message.startswith("2 of 6 images could not be read")
    assert str(paths[1]) in message and str(paths[4]) in message and "truncated" in message
    index = json.loads((out / "index.json").read_text())
    assert [f["row"] for f in index["failed"]] == [1, 4] and not index["complete"]
    assert index["done"] == 6
    with pytest.raises(FeatureCacheError, match="incomplete"):
        FeatureCache.open(out)
    assert not np.memmap(out / "grid.f16", "<f2", mode="r")[[1, 4]].any()  # zero rows

    for i in (1, 4):  # the user fixes the files; only those two rows are recomputed
        shutil.copy(images[i], paths[i])
    assert pending_rows(tiny_encoder(), ids_of(paths), out) == 2
    fixed = extract(paths, out)
    clean = extract(paths, tmp_path / "clean")
    np.testing.assert_allclose(fixed.grid_array, clean.grid_array, atol=1e-3)
    np.testing.assert_array_equal(fixed.pooled_array[[0, 2, 3, 5]], clean.pooled_array[[0, 2, 3, 5]])


def test_inputs_are_checked(images, tmp_path):
    with pytest.raises(ValueError, match="unique"):
        extract_features(tiny_encoder(), images[:2], ["a", "a"], tmp_path, progress=False)
    with pytest.raises(ValueError, match="2 image paths but 1"):
        extract_features(tiny_encoder(), images[:2], ["a"], tmp_path, progress=False)


# ---------------------------------------------------------------------------- ensure_cache


def test_ensure_cache_reuses_a_superset_cache(images, reference, tmp_path, monkeypatch):
    import captioner.model.encoders as encoders

    monkeypatch.setitem(encoders.ENCODERS, "tiny", lambda pretrained=True: tiny_encoder())
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    subset = images[::-3]  # fewer images, other order: rows are looked up by id
    cache = ensure_cache(tmp_path, "tiny", subset, ids_of(subset), workers=0, progress=False)
    assert cache.fingerprint == FeatureCache.open(reference).fingerprint
    outside = [images[0], images[-1]]
    cache = ensure_cache(tmp_path / "other", "tiny", outside, ids_of(outside), workers=0, progress=False)
    assert cache.image_ids == ids_of(outside)


def test_ensure_cache_never_overwrites_a_cache_of_other_images(images, reference, tmp_path, monkeypatch):
    """A complete cache that lacks some of the images is someone's cache of another set:
    refused with a one-line reason, its bytes untouched."""
    import captioner.model.encoders as encoders

    monkeypatch.setitem(encoders.ENCODERS, "tiny", lambda pretrained=True: tiny_encoder())
    partial = tmp_path / "partial"
    extract(images[:4], partial)
    before = {f.name: f.read_bytes() for f in partial.iterdir()}
    with pytest.raises(FeatureCacheError, match=r"lacks 2 of the 6 images needed .*not overwriting it"):
        ensure_cache(partial, "tiny", images[:6], ids_of(images[:6]), workers=0, progress=False)
    assert {f.name: f.read_bytes() for f in partial.iterdir()} == before


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture
def small_dataset(tmp_path, monkeypatch) -> Path:
    """A folder dataset of 8 generated photos (2 train, 3 dev, 3 test), and the tiny
    encoder registered as "tiny" for the command to build."""
    import captioner.model.encoders as encoders
    from PIL import Image

    monkeypatch.setitem(encoders.ENCODERS, "tiny", lambda pretrained=True: tiny_encoder())
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, split in enumerate(["train", "train", "dev", "dev", "dev", "test", "test", "test"]):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / f"p{i}.png")
        lines.append(json.dumps({"image": f"p{i}.png", "caption": f"photo {i}", "split": split}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_features_command(small_dataset, tmp_path, capsys):
    from captioner.cli import main

    out = tmp_path / "cache"
    argv = ["features", "--dataset", "folder", "--data-root", str(small_dataset), "--encoder", "tiny",
            "--out", str(out), "--workers", "0", "--splits", "test,dev", "--device", "cpu"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("features: 6 images encoded in") and "images/s" in line
    assert FeatureCache.open(out).image_ids == [f"p{i}.png" for i in range(2, 8)]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("features: 0 images encoded")


def test_features_command_offline_torchvision_error(flickr8k_root, tmp_path, monkeypatch, capsys):
    from captioner.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code = main(["features", "--dataset", "flickr8k", "--data-root", str(flickr8k_root),
                 "--out", str(tmp_path / "c"), "--encoder", "resnet18"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 1 and len(errors) == 1  # one line (dataset warnings may precede it)
    assert errors[0].startswith("captioner: error: resnet18: pretrained weights")
    assert "resnet18-f37072fd.pth" in errors[0]


def test_features_command_unwritable_out(small_dataset, tmp_path, capsys):
    from captioner.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(["features", "--dataset", "folder", "--data-root", str(small_dataset), "--encoder", "tiny",
                 "--out", str(blocker / "cache"), "--workers", "0"])
    assert code == 1
    assert f"captioner: error: {blocker / 'cache'}: cannot write the feature cache" in capsys.readouterr().err


def test_thread_count_is_set_for_the_run_and_restored(images, reference, tmp_path, monkeypatch):
    seen = []
    real_encode = writer.encode_batch
    monkeypatch.setattr(writer, "encode_batch", lambda *a: seen.append(torch.get_num_threads()) or real_encode(*a))
    before = torch.get_num_threads()
    extract(images, tmp_path, threads=1)
    assert set(seen) == {1} and torch.get_num_threads() == before
    assert file_bytes(tmp_path) == file_bytes(reference)  # thread count does not change bytes
    assert extraction.default_threads(workers=10**6) == 1


def test_a_second_writer_waits_for_the_first(images, reference, tmp_path, caplog):
    """Concurrent extractions into one directory are serialized by an flock on it."""
    import threading

    done = threading.Event()
    worker = threading.Thread(target=lambda: (extract(images, tmp_path), done.set()))
    with extraction._writer_lock(tmp_path):  # "another process" holds the cache
        worker.start()
        assert not done.wait(timeout=1.0)
        assert "another process is writing it" in caplog.text
    worker.join(timeout=60)
    assert done.is_set() and file_bytes(tmp_path) == file_bytes(reference)
