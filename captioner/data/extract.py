"""Building feature caches: extraction that resumes, repairs and never writes a bad row,
`ensure_cache` for training, and the cache of a whole dataset (`captioner features`).

Extraction is resumable: rows are written a batch at a time, the data files flushed, and only
then is index.json replaced atomically with the new `done` and the rows' checksums, so a
killed run continues from `done`, byte-identical to an uninterrupted run (writer.py).
Running over an existing cache of the same encoder and images first verifies every written
row (checksums and finiteness, one fast pass) and re-encodes the damaged ones; a cache that
cannot be trusted as a whole (other encoder or images, an older format, an edited index, a
data file of the wrong size) is rebuilt. One writer per directory at a time: an flock on the
directory.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from captioner.data.cache import (
    DTYPE, FORMAT_VERSION, GRID_FILE, INDEX_FILE, FeatureCache, check_data_files,
    damaged_rows, encoder_identity, index_fingerprints, read_index,
)
from captioner.data.writer import create_files, default_threads, intra_op_threads, write_rows
from captioner.errors import FeatureCacheError, ImageFeaturesError, OutputError, shown_path

if TYPE_CHECKING:
    from captioner.model.encoder import Encoder

__all__ = ["CacheReport", "build_dataset_cache", "default_threads", "ensure_cache", "extract_features",
           "pending_rows"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheReport:
    """What `build_dataset_cache` did: the cache, how many rows it encoded (0 when the cache
    was up to date), how many of those replaced damaged rows, and how long it took."""

    cache: FeatureCache
    encoded: int
    repaired: int
    seconds: float


@dataclass
class _Plan:
    """Where an extraction starts: the index to continue and the rows to write."""

    index: dict[str, Any]
    needed: list[int]  # rows to (re)write: not yet done, failed before, or damaged
    repaired: int  # how many of them were damaged
    fresh: bool  # the data files must be created
    reason: str  # why (new, rebuild, resume, repair, up to date), for the log


# ------------------------------------------------------------------------------ public API


def extract_features(
    encoder: Encoder,
    image_paths: Sequence[str | os.PathLike[str]],
    image_ids: Sequence[str],
    out_dir: str | os.PathLike[str],
    batch_size: int = 64,
    workers: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
    threads: int | None = None,
) -> FeatureCache:
    """Compute, finish or repair the cache of `encoder` over the images, in the given order.

    An intact up-to-date cache is opened as is; a matching one is resumed and its damaged
    rows re-encoded; anything else in `out_dir` is rebuilt from scratch. Unreadable images
    (and images whose features are not finite) leave zero rows, are listed as `failed` in the
    index, and raise ImageFeaturesError at the end (after all other rows are written, so a
    re-run only retries those). The encoder is moved to `device`. `threads`: torch
    intra-op threads while encoding on CPU (default: the CPUs left over by `workers`).
    """
    paths, ids = _check_inputs(image_paths, image_ids)
    directory = Path(out_dir)
    with _writer_lock(directory):
        return _extract(encoder, paths, ids, directory, batch_size, workers, device, progress, threads)[0]


def pending_rows(encoder: Encoder, image_ids: Sequence[str], out_dir: str | os.PathLike[str]) -> int:
    """How many rows `extract_features` would write now (0 for an intact up-to-date cache);
    reads the whole cache once when there is one to verify."""
    fresh = _new_index(encoder, [str(i) for i in image_ids])
    return len(_plan(Path(out_dir), fresh).needed)


def ensure_cache(
    out_dir: str | os.PathLike[str],
    encoder_name: str,
    image_paths: Sequence[str | os.PathLike[str]],
    image_ids: Sequence[str],
    batch_size: int = 64,
    workers: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureCache:
    """A cache that holds features of every image in `image_ids`, building one if needed.

    A complete cache of the same encoder fingerprint (weights, preprocessing) that holds
    more images (e.g. all splits, built by `captioner features`) or orders them differently
    is used as is: rows are looked up by id, and checked as they are read. A complete cache
    of that encoder which lacks some of the ids is someone's cache of other images: it is
    refused (FeatureCacheError), never overwritten. A cache of exactly these images is
    verified and repaired; anything else (no cache, an interrupted one, other encoder
    weights, damaged files) is built or resumed for exactly these images.
    """
    from captioner.model.encoders import build_encoder

    encoder = build_encoder(encoder_name)
    directory = Path(out_dir)
    paths, ids = _check_inputs(image_paths, image_ids)
    cache = _covering_cache(directory, encoder, ids)  # the common case: no lock needed
    if cache is not None:
        return cache
    with _writer_lock(directory):
        # Another process may have finished a covering cache while we waited for the lock.
        cache = _covering_cache(directory, encoder, ids)
        if cache is not None:
            return cache
        return _extract(encoder, paths, ids, directory, batch_size, workers, device, progress, None)[0]


def build_dataset_cache(
    dataset: str,
    data_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    encoder: str = "efficientnet-lite0",
    splits: Sequence[str] | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str | torch.device = "cpu",
    skip_missing: bool = False,
    progress: bool = True,
) -> CacheReport:
    """Every image of a dataset (or of `splits`), sorted by image id so the same images
    always give the same cache, into one cache at `out`: built, resumed or repaired.

    Raises DatasetError, UnknownEncoderError, EncoderWeightsError, ImageFeaturesError, or
    OutputError when `out` cannot be written. `device` is a concrete device ("cpu",
    "cuda", "cuda:1"), not "auto".
    """
    from captioner.data.sources import read_dataset
    from captioner.model.encoders import build_encoder

    records = read_dataset(dataset, data_root, splits=splits, skip_missing=skip_missing)
    by_id = {r.image_id: r.path for r in sorted(records, key=lambda r: r.image_id)}
    model = build_encoder(encoder)
    directory = Path(out)
    start = time.perf_counter()
    try:
        with _writer_lock(directory):
            cache, plan = _extract(model, list(by_id.values()), list(by_id), directory, batch_size, workers,
                                   device, progress, None)
    except OutputError:
        raise
    except OSError as exc:  # an unwritable --out, a full disk: name the cache, not a traceback
        raise OutputError(f"{shown_path(directory)}: cannot write the feature cache "
                          f"({exc.strerror or exc})") from None
    return CacheReport(cache, len(plan.needed), plan.repaired, time.perf_counter() - start)


# ------------------------------------------------------------------------------- planning


def _check_inputs(image_paths: Sequence[str | os.PathLike[str]],
                  image_ids: Sequence[str]) -> tuple[list[Path], list[str]]:
    paths, ids = [Path(p) for p in image_paths], [str(i) for i in image_ids]
    if len(paths) != len(ids):
        raise ValueError(f"{len(paths)} image paths but {len(ids)} image ids")
    if not ids:
        raise ValueError("no images to extract features from")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    return paths, ids


def _new_index(encoder: Encoder, image_ids: list[str]) -> dict[str, Any]:
    """The index of an empty cache; its fingerprints are computed from its own fields, as
    `read_index` recomputes them."""
    identity = encoder_identity(encoder)
    n, (length, dim) = len(image_ids), identity.pop("feature_shape")
    index = {
        "format_version": FORMAT_VERSION,
        "fingerprint": "",
        "encoder_fingerprint": "",
        **identity,
        "image_ids": image_ids,
        "grid_shape": [n, length, dim],
        "pooled_shape": [n, dim],
        "dtype": DTYPE.str,
        "done": 0,
        "failed": [],
        "complete": False,
        "checksums": [None] * n,
    }
    index["encoder_fingerprint"], index["fingerprint"] = index_fingerprints(index)
    return index


def _plan(directory: Path, fresh: dict[str, Any]) -> _Plan:
    """Continue (verify, repair, resume) a matching cache, or start over when there is none
    or it cannot be trusted as a whole."""
    n = len(fresh["image_ids"])
    try:
        index = read_index(directory)
        if index["fingerprint"] != fresh["fingerprint"]:
            raise FeatureCacheError("built for other encoder weights, preprocessing or images")
        check_data_files(directory, index)
    except FeatureCacheError as exc:
        exists = (directory / INDEX_FILE).exists() or (directory / GRID_FILE).exists()
        return _Plan(fresh, list(range(n)), 0, True, f"rebuilding ({exc})" if exists else "new cache")
    damaged = damaged_rows(directory, index)
    retry = [f["row"] for f in index["failed"]]  # images that may have been fixed since
    needed = sorted({*damaged, *retry, *range(index["done"], n)})
    if damaged:
        reason = f"repairing {len(damaged)} damaged rows (e.g. {index['image_ids'][damaged[0]]})"
    elif index["complete"]:
        reason = "up to date"
    else:
        reason = f"resuming at row {index['done']} of {n}"
    return _Plan(index, needed, len(damaged), False, reason)


# ------------------------------------------------------------------------------- extraction


def _extract(encoder: Encoder, paths: list[Path], ids: list[str], directory: Path, batch_size: int,
             workers: int, device: str | torch.device, progress: bool,
             threads: int | None) -> tuple[FeatureCache, _Plan]:
    """extract_features, with the directory's writer lock held; also returns the plan."""
    plan = _plan(directory, _new_index(encoder, ids))
    level = logging.WARNING if plan.reason.startswith(("rebuilding", "repairing")) else logging.INFO
    log.log(level, "feature cache %s: %s", directory, plan.reason)
    if plan.fresh:
        create_files(directory, plan.index)
    if plan.needed:
        device = torch.device(device)
        cpu_threads = (threads or default_threads(workers)) if device.type == "cpu" else None
        with intra_op_threads(cpu_threads):
            write_rows(encoder, paths, plan.index, plan.needed, directory, batch_size, workers, device,
                       progress)
    if plan.index["failed"]:
        raise ImageFeaturesError(plan.index["failed"], len(ids), directory / INDEX_FILE)
    return FeatureCache.open(directory, plan.index["fingerprint"]), plan


@contextmanager
def _writer_lock(directory: Path) -> Iterator[None]:
    """One writer per cache directory; a second one waits for the first to finish.

    Two extractions into one directory would fight over index.json, and a rebuild would swap
    the data files under the other (three training runs started together all build the same
    cache). The lock is an flock on the directory itself (no lock file to leave behind) and
    dies with its process, so a killed run never leaves the cache locked.
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("feature cache %s: another process is writing it; waiting for it", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _covering_cache(directory: Path, encoder: Encoder, image_ids: Sequence[str]) -> FeatureCache | None:
    """The complete cache in `directory` if it has this encoder's features of every id and
    is not exactly the cache of these ids (that one is verified and repaired by
    extraction); None otherwise; FeatureCacheError if a complete one of this encoder lacks
    some ids (rebuilding it for these ids would throw its other rows away)."""
    try:
        cache = FeatureCache.open(directory)
    except FeatureCacheError:
        return None
    if not cache.matches(encoder):
        return None
    missing = [i for i in image_ids if i not in cache]
    if missing:
        raise FeatureCacheError(
            f"{shown_path(directory)}: this feature cache ({len(cache)} images) lacks {len(missing)} of the "
            f"{len(image_ids)} images needed (e.g. {missing[0]}); not overwriting it: use another "
            "directory, or delete it to rebuild")
    if cache.image_ids == list(image_ids):
        return None
    return cache
