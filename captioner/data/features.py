"""FeatureCache: a frozen encoder's features, computed once and memory-mapped from disk.

Layout of a cache directory:

    grid.f16     float16 [N, L, C], raw C-order bytes (np.memmap)
    pooled.f16   float16 [N, C]
    index.json   format_version, fingerprint, encoder, preprocessing, image_ids, shapes,
                 dtype, done (rows written, in order), failed (rows whose image could not be
                 read), complete

The fingerprint is a sha256 over the encoder name, the exact weights (a digest of the state
dict), the preprocessing, the feature shape and the ordered image ids. A cache is used only
when it matches, is complete, and its files have exactly the expected sizes; anything else is
`StaleCacheError` on open and a rebuild on extraction, never silently used.

Extraction is resumable: rows are written a batch at a time, the memmaps flushed, and only then
is index.json replaced atomically with the new `done`. A killed run continues from `done`, and
with the same batch size, device and thread settings the result is byte-identical to an
uninterrupted run (each batch is exactly the batch the uninterrupted run would compute). Why
those must match: CPU kernels round differently for different batch shapes; lite0 features of
the same images encoded 4 at a time vs 64 at a time differ by one float16 step in ~0.1% of
values. (On CPU, chunks of CPU_CHUNK images make any batch size that is a multiple of it give
the same bytes.) One writer per directory at a time: an flock on the directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from captioner.model.encoders import Features, Preprocessing

if TYPE_CHECKING:
    import argparse

    from captioner.model.encoders import Encoder

__all__ = [
    "FeatureCache",
    "ImageFeaturesError",
    "StaleCacheError",
    "cache_fingerprint",
    "default_threads",
    "encoder_fingerprint",
    "ensure_cache",
    "extract_features",
    "pending_rows",
    "run_features_command",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GRID_FILE = "grid.f16"
POOLED_FILE = "pooled.f16"
INDEX_FILE = "index.json"
DTYPE = np.dtype("<f2")  # little-endian float16, whatever the machine
_INDEX_KEYS = {
    "format_version": int, "fingerprint": str, "encoder_fingerprint": str, "encoder": str,
    "preprocessing": dict, "image_ids": list, "grid_shape": list, "pooled_shape": list,
    "dtype": str, "done": int, "failed": list, "complete": bool,
}


class StaleCacheError(RuntimeError):
    """A cache that must not be used: stale, incomplete, truncated or with a corrupt index."""


class ImageFeaturesError(RuntimeError):
    """Some images could not be read; their rows are listed in the index as failed."""

    def __init__(self, failed: list[dict[str, Any]], total: int, directory: Path) -> None:
        self.failed = failed
        shown = "; ".join(f["error"] for f in failed[:5])
        more = f"; and {len(failed) - 5} more (all listed in {directory / INDEX_FILE})" if len(failed) > 5 else ""
        super().__init__(
            f"{len(failed)} of {total} images could not be read: {shown}{more}. Fix or remove "
            f"them and run again: the {total - len(failed)} finished rows are kept")


# ----------------------------------------------------------------------------- fingerprint


def encoder_fingerprint(encoder: Encoder) -> str:
    """sha256 of what determines one image's features: encoder, exact weights, preprocessing."""
    identity = {
        "format_version": FORMAT_VERSION,
        "encoder": encoder.name,
        "weights": encoder.weights_digest(),
        "preprocessing": encoder.preprocessing.to_dict(),
        "feature_shape": [encoder.grid_size, encoder.feature_dim],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cache_fingerprint(encoder: Encoder, image_ids: Sequence[str]) -> str:
    """sha256 identifying a whole cache: the encoder fingerprint plus the ordered image ids."""
    return _fingerprint(encoder_fingerprint(encoder), image_ids)


def _fingerprint(encoder_fp: str, image_ids: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([encoder_fp, list(image_ids)]).encode()).hexdigest()


# ----------------------------------------------------------------------------- index files


def _read_index(directory: Path) -> dict[str, Any]:
    """Parse and sanity-check index.json; any problem is a StaleCacheError naming it."""
    path = directory / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise StaleCacheError(f"{directory}: not a feature cache (no {INDEX_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StaleCacheError(f"{path}: corrupt index ({exc})") from None
    if not isinstance(index, dict):
        raise StaleCacheError(f"{path}: corrupt index (not a JSON object)")
    for key, kind in _INDEX_KEYS.items():
        if not isinstance(index.get(key), kind):
            raise StaleCacheError(f"{path}: corrupt index ({key!r} missing or not {kind.__name__})")
    if index["format_version"] != FORMAT_VERSION:
        raise StaleCacheError(f"{path}: format version {index['format_version']}, expected {FORMAT_VERSION}")
    n = len(index["image_ids"])
    grid_shape, pooled_shape = index["grid_shape"], index["pooled_shape"]
    if (len(grid_shape) != 3 or len(pooled_shape) != 2 or grid_shape[0] != n or pooled_shape[0] != n
            or grid_shape[2] != pooled_shape[1] or index["dtype"] != DTYPE.str
            or not 0 <= index["done"] <= n or len(set(index["image_ids"])) != n):
        raise StaleCacheError(f"{path}: corrupt index (inconsistent shapes, dtype, ids or done)")
    return index


def _check_data_files(directory: Path, index: dict[str, Any]) -> None:
    """Both data files exist at exactly their full size (they are created full size)."""
    for name, shape in ((GRID_FILE, index["grid_shape"]), (POOLED_FILE, index["pooled_shape"])):
        path = directory / name
        expected = int(np.prod(shape)) * DTYPE.itemsize
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            raise StaleCacheError(f"{path}: truncated or missing ({actual} bytes, expected {expected})")


def _write_index(directory: Path, index: dict[str, Any]) -> None:
    """Replace index.json atomically: a reader sees the old or the new index, never half."""
    tmp = directory / f".{INDEX_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / INDEX_FILE)


# ------------------------------------------------------------------------------ the cache


class FeatureCache:
    """Read-only view of a complete cache; rows are read from disk only when asked for."""

    def __init__(self, directory: Path, index: dict[str, Any]) -> None:
        self.directory = directory
        self.index = index
        self.grid_array = np.memmap(directory / GRID_FILE, DTYPE, mode="r", shape=tuple(index["grid_shape"]))
        self.pooled_array = np.memmap(directory / POOLED_FILE, DTYPE, mode="r", shape=tuple(index["pooled_shape"]))
        self._rows = {image_id: i for i, image_id in enumerate(index["image_ids"])}
        self._fd: int | None = None  # grid file descriptor for preadv, opened on first read
        self._fd_pid: int | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike[str], expected_fingerprint: str | None = None) -> FeatureCache:
        """Open a cache; StaleCacheError unless it is complete, intact and (if given) matching."""
        directory = Path(directory)
        index = _read_index(directory)
        if expected_fingerprint is not None and index["fingerprint"] != expected_fingerprint:
            raise StaleCacheError(
                f"{directory}: stale feature cache (built for other encoder weights, "
                f"preprocessing or images); rebuild it with `captioner features`")
        if not index["complete"]:
            raise StaleCacheError(
                f"{directory}: incomplete feature cache ({index['done']} of {len(index['image_ids'])} "
                f"rows, {len(index['failed'])} failed); run `captioner features` again to finish it")
        _check_data_files(directory, index)
        return cls(directory, index)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r}, {self.encoder}, grid {tuple(self.index['grid_shape'])})"

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    @property
    def encoder(self) -> str:
        return self.index["encoder"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.index["preprocessing"])

    @property
    def image_ids(self) -> list[str]:
        return self.index["image_ids"]

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._rows

    def index_of(self, image_id: str) -> int:
        try:
            return self._rows[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in the feature cache {self.directory}") from None

    def grid(self, i: int) -> Tensor:
        """[L, C] float32."""
        return self.get([i]).grid[0]

    def pooled(self, i: int) -> Tensor:
        """[C] float32."""
        return torch.from_numpy(self.pooled_array[i].astype(np.float32))

    def get(self, indices: Sequence[int] | np.ndarray | Tensor, grid: bool = True) -> Features:
        """Rows `indices` as float32 Features([B, L, C] or None, [B, C]); reads only those rows."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        pooled = torch.from_numpy(self.pooled_array[rows].astype(np.float32))
        grids = torch.from_numpy(self._read_grid_rows(rows).astype(np.float32)) if grid else None
        return Features(grid=grids, pooled=pooled)

    def _read_grid_rows(self, rows: np.ndarray) -> np.ndarray:
        """Grid rows with positional reads (os.preadv) into one buffer.

        Reading through the memmap would map every touched page into this process: on a
        COCO-sized cache an epoch touches all 15 GB and the pages count toward RSS (and toward
        a container's memory limit). preadv copies the rows and leaves the file pages in the
        kernel's page cache, which is reclaimable; it is also faster than fancy-indexing a
        memmap (no page-fault per 4 KiB page). The descriptor is opened lazily, so a cache
        pickled into DataLoader workers opens its own.
        """
        out = np.empty((len(rows), *self.grid_array.shape[1:]), DTYPE)
        row_bytes = out[0].nbytes if len(rows) else 0
        fd = self._grid_fd()
        for k, row in enumerate(rows):
            if not 0 <= row < self.grid_array.shape[0]:
                raise IndexError(f"row {row} out of range for the feature cache {self.directory}")
            view = memoryview(out[k]).cast("B")
            if os.preadv(fd, [view], int(row) * row_bytes) != row_bytes:
                raise StaleCacheError(f"{self.directory / GRID_FILE}: short read at row {row} (truncated?)")
        return out

    def _grid_fd(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.directory / GRID_FILE, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_fd_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)


# ------------------------------------------------------------------------------ extraction


class _ImageDataset(Dataset):
    """Decodes and preprocesses the images of `rows`; a bad file becomes an error string,
    never an exception, so one broken image cannot kill the DataLoader's worker."""

    def __init__(self, paths: Sequence[Path], rows: Sequence[int], preprocessing: Preprocessing) -> None:
        self.paths = paths
        self.rows = rows
        self.transform = preprocessing.transform()
        self.draft_size = preprocessing.draft_size
        self.size = preprocessing.size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[int, Tensor, str]:
        from captioner.images import ImageLoadError, load_image

        row = self.rows[k]
        try:
            image = load_image(self.paths[row], draft_size=self.draft_size)
            return row, self.transform(image), ""
        except ImageLoadError as exc:
            return row, torch.zeros(3, self.size, self.size), str(exc)


@dataclass
class _Plan:
    """Where an extraction starts: the index to continue and the rows still to compute."""

    index: dict[str, Any]
    rows: list[int]
    reason: str  # why (resume, rebuild, up to date), for the log


def _new_index(encoder: Encoder, image_ids: list[str], encoder_fp: str) -> dict[str, Any]:
    n, length, dim = len(image_ids), encoder.grid_size, encoder.feature_dim
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": _fingerprint(encoder_fp, image_ids),
        "encoder_fingerprint": encoder_fp,
        "encoder": encoder.name,
        "preprocessing": encoder.preprocessing.to_dict(),
        "image_ids": image_ids,
        "grid_shape": [n, length, dim],
        "pooled_shape": [n, dim],
        "dtype": DTYPE.str,
        "done": 0,
        "failed": [],
        "complete": False,
    }


def _plan(directory: Path, fresh: dict[str, Any]) -> _Plan:
    """Continue a matching cache, or start over when there is none or it cannot be trusted."""
    n = len(fresh["image_ids"])
    try:
        index = _read_index(directory)
        if index["fingerprint"] != fresh["fingerprint"]:
            raise StaleCacheError("stale: built for other encoder weights, preprocessing or images")
        _check_data_files(directory, index)
    except StaleCacheError as exc:
        exists = (directory / INDEX_FILE).exists() or (directory / GRID_FILE).exists()
        return _Plan(fresh, list(range(n)), f"rebuilding ({exc})" if exists else "new cache")
    retry = [f["row"] for f in index["failed"]]  # images that may have been fixed since
    rows = retry + list(range(index["done"], n))
    reason = "up to date" if index["complete"] else f"resuming at row {index['done']} of {n}"
    return _Plan(index, rows, reason)


def _create_files(directory: Path, index: dict[str, Any]) -> None:
    """Fresh cache: drop the old index first (old data must never pair with it), then create
    both data files at full size, zero-filled, then the index with done = 0.

    New files replace the old ones by rename rather than truncation, so a reader that still
    maps the old files keeps valid (old) pages instead of crashing with SIGBUS.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INDEX_FILE).unlink(missing_ok=True)
    for name, shape in ((GRID_FILE, index["grid_shape"]), (POOLED_FILE, index["pooled_shape"])):
        tmp = directory / f".{name}.{os.getpid()}.tmp"
        array = np.memmap(tmp, DTYPE, mode="w+", shape=tuple(shape))
        array.flush()
        del array
        os.replace(tmp, directory / name)
    _write_index(directory, index)


def _check_inputs(image_paths: Sequence[Path], image_ids: Sequence[str]) -> None:
    if len(image_paths) != len(image_ids):
        raise ValueError(f"{len(image_paths)} image paths but {len(image_ids)} image ids")
    if not image_ids:
        raise ValueError("no images to extract features from")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image ids must be unique")


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
    """Compute (or finish) the cache of `encoder` over the images, in the given order.

    An up-to-date cache is opened as is; a matching unfinished one is resumed; anything else
    in `out_dir` is rebuilt from scratch. Unreadable images leave zero rows, are listed as
    `failed` in the index, and raise ImageFeaturesError at the end (after all other rows are
    written, so a re-run only retries those). The encoder is moved to `device`. `threads`:
    torch intra-op threads while encoding on CPU (default: the CPUs left over by `workers`).
    """
    paths, ids = [Path(p) for p in image_paths], [str(i) for i in image_ids]
    _check_inputs(paths, ids)
    directory = Path(out_dir)
    with _writer_lock(directory):
        return _extract(encoder, paths, ids, directory, batch_size, workers, device, progress, threads)


def _extract(encoder: Encoder, paths: list[Path], ids: list[str], directory: Path, batch_size: int,
             workers: int, device: str | torch.device, progress: bool, threads: int | None) -> FeatureCache:
    """extract_features, with the directory's writer lock held."""
    encoder_fp = encoder_fingerprint(encoder)
    plan = _plan(directory, _new_index(encoder, ids, encoder_fp))
    if plan.reason.startswith("rebuilding"):
        log.warning("feature cache %s: %s", directory, plan.reason)
    else:
        log.info("feature cache %s: %s", directory, plan.reason)
    if plan.reason.startswith(("rebuilding", "new")):
        _create_files(directory, plan.index)
    if plan.rows:
        device = torch.device(device)
        cpu_threads = (threads or default_threads(workers)) if device.type == "cpu" else None
        with _intra_op_threads(cpu_threads):
            _run(encoder, paths, plan, directory, batch_size, workers, device, progress)
    if plan.index["failed"]:
        raise ImageFeaturesError(plan.index["failed"], len(ids), directory)
    return FeatureCache.open(directory, plan.index["fingerprint"])


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


def default_threads(workers: int) -> int:
    """Intra-op threads for CPU extraction: the CPUs not taken by decoding workers, at least 1.

    Measured on a 2-CPU machine shared with other jobs, 2 decoding workers: 1 thread 12.6-14.8
    images/s, 2 threads 2.6-4.4 (with more runnable threads than cores, OpenMP threads
    spin at every barrier waiting for a descheduled peer).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus - workers)


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """torch.set_num_threads(n) for the duration (it is process-wide), then restore."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _run(encoder: Encoder, paths: list[Path], plan: _Plan, directory: Path, batch_size: int,
         workers: int, device: torch.device, progress: bool) -> None:
    """The batch loop: encode, write rows, flush, then commit `done` in the index."""
    from tqdm.auto import tqdm

    index = plan.index
    grid = np.memmap(directory / GRID_FILE, DTYPE, mode="r+", shape=tuple(index["grid_shape"]))
    pooled = np.memmap(directory / POOLED_FILE, DTYPE, mode="r+", shape=tuple(index["pooled_shape"]))
    loader = DataLoader(_ImageDataset(paths, plan.rows, encoder.preprocessing), batch_size=batch_size,
                        shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    failed = {f["row"]: f for f in index["failed"]}
    was_training = encoder.training
    encoder.eval().to(device)  # eval: fixed BatchNorm statistics, no dropout: deterministic
    bar = tqdm(total=len(paths), initial=len(paths) - len(plan.rows), unit="img",
               desc=f"features {encoder.name}", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for rows, images, errors in loader:
                feats = _encode(encoder, images, device)
                _write_rows(grid, pooled, rows.numpy(), feats, errors)
                grid.flush()
                pooled.flush()
                _commit(index, rows.tolist(), errors, paths, failed)
                _write_index(directory, index)
                bar.update(len(rows))
    finally:
        bar.close()
        encoder.train(was_training)
        del grid, pooled


# On CPU a batch is encoded a few images at a time. Big batches' activations exceed glibc's
# mmap threshold (32 MB at most), so each forward pass maps fresh pages and faults them in:
# measured on efficientnet-lite0, one thread, per image: batch 64 = 33 ms computing + 90 ms in
# the kernel; batch 16 = 33 + 35; batch 4 = 30 + 8-15. Chunks of 4 stay on the reused heap.
CPU_CHUNK = 4


def _encode(encoder: Encoder, images: Tensor, device: torch.device) -> Features:
    """Encoder over one batch; on CPU in chunks of CPU_CHUNK (see above)."""
    chunk = CPU_CHUNK if device.type == "cpu" else len(images)
    parts = [encoder(x.to(device, non_blocking=True)) for x in images.split(chunk)]
    return Features(torch.cat([p.grid for p in parts]), torch.cat([p.pooled for p in parts]))


def _write_rows(grid: np.memmap, pooled: np.memmap, rows: np.ndarray, feats: Features,
                errors: Sequence[str]) -> None:
    """float16 rows into the memmaps; an unreadable image's row is zeros."""
    if tuple(feats.grid.shape[1:]) != grid.shape[1:]:
        raise ValueError(f"encoder produced grid {tuple(feats.grid.shape[1:])}, cache expects "
                         f"{grid.shape[1:]}: images not preprocessed to the spec size?")
    g = feats.grid.to("cpu", torch.float16).numpy()
    p = feats.pooled.to("cpu", torch.float16).numpy()
    bad = np.array([bool(e) for e in errors])
    g[bad] = 0
    p[bad] = 0
    grid[rows] = g
    pooled[rows] = p


def _commit(index: dict[str, Any], rows: list[int], errors: Sequence[str], paths: list[Path],
            failed: dict[int, dict[str, Any]]) -> None:
    """Advance `done` past this batch and update the failed list (retried rows may now pass)."""
    for row, error in zip(rows, errors):
        if error:
            failed[row] = {"row": row, "image_id": index["image_ids"][row], "path": str(paths[row]),
                           "error": error}
        else:
            failed.pop(row, None)
    index["done"] = max(index["done"], max(rows) + 1)
    index["failed"] = [failed[r] for r in sorted(failed)]
    index["complete"] = index["done"] == len(index["image_ids"]) and not failed


def pending_rows(encoder: Encoder, image_ids: Sequence[str], out_dir: str | os.PathLike[str]) -> int:
    """How many rows `extract_features` would compute now (0 for an up-to-date cache)."""
    fresh = _new_index(encoder, [str(i) for i in image_ids], encoder_fingerprint(encoder))
    return len(_plan(Path(out_dir), fresh).rows)


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

    An existing complete cache of the same encoder weights and preprocessing is used as is
    when it covers all the ids, even if it holds more (e.g. all splits, built by `captioner
    features`) or orders them differently: rows are looked up by id. A complete cache of the
    same encoder that lacks some of the ids is someone's cache of other images: it is refused
    (StaleCacheError), never overwritten. Anything else (no cache, an interrupted one, other
    encoder weights, damaged files) is built or resumed for exactly these images.
    """
    from captioner.model.encoders import build_encoder

    encoder = build_encoder(encoder_name)
    directory = Path(out_dir)
    encoder_fp = encoder_fingerprint(encoder)
    cache = _covering_cache(directory, encoder_fp, image_ids)  # the common case: no lock needed
    if cache is not None:
        return cache
    paths, ids = [Path(p) for p in image_paths], [str(i) for i in image_ids]
    _check_inputs(paths, ids)
    with _writer_lock(directory):
        # Another process may have finished a covering cache while we waited for the lock.
        cache = _covering_cache(directory, encoder_fp, ids)
        if cache is not None:
            return cache
        return _extract(encoder, paths, ids, directory, batch_size, workers, device, progress, None)


def _covering_cache(directory: Path, encoder_fp: str, image_ids: Sequence[str]) -> FeatureCache | None:
    """The complete cache in `directory` if it has this encoder's features of every id; None
    if there is no usable cache there; StaleCacheError if a complete one of this encoder
    lacks some ids (rebuilding it for these ids would throw its other rows away)."""
    try:
        cache = FeatureCache.open(directory)
    except StaleCacheError:
        return None
    if cache.index["encoder_fingerprint"] != encoder_fp:
        return None
    missing = [i for i in image_ids if i not in cache]
    if missing:
        raise StaleCacheError(
            f"{directory}: this feature cache ({len(cache)} images) lacks {len(missing)} of the "
            f"{len(image_ids)} images needed (e.g. {missing[0]}); not overwriting it: use another "
            "directory, or delete it to rebuild")
    return cache


# ------------------------------------------------------------------------------------ CLI


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_features_command(args: argparse.Namespace) -> int:
    """`captioner features`: every image of the dataset (sorted by id) into one cache."""
    from captioner.cli import CaptionerError
    from captioner.data.sources import DatasetError, read_dataset
    from captioner.model.encoders import EncoderWeightsError, build_encoder

    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    try:
        records = read_dataset(args.dataset, args.data_root, splits=splits, skip_missing=args.skip_missing)
    except DatasetError as exc:  # name the command-line flag, not the Python argument
        raise CaptionerError(str(exc).replace("(skip_missing=True drops them)",
                                              "(--skip-missing drops them)")) from None
    # Sorted by id, so the same images give the same cache whatever the split order.
    by_id = {r.image_id: r.path for r in sorted(records, key=lambda r: r.image_id)}
    if not by_id:
        raise CaptionerError(f"{args.data_root}: no images in dataset {args.dataset!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CaptionerError("--device cuda was asked for but torch sees no CUDA device")
    try:
        encoder = build_encoder(args.encoder)
    except KeyError as exc:
        raise CaptionerError(exc.args[0]) from None
    except EncoderWeightsError as exc:
        raise CaptionerError(str(exc)) from None
    if args.mirror:
        encoder.preprocessing = dataclasses.replace(encoder.preprocessing, mirror=True)
    ids = list(by_id)
    todo = pending_rows(encoder, ids, args.out)
    start = time.perf_counter()
    try:
        cache = extract_features(encoder, list(by_id.values()), ids, args.out, batch_size=args.batch_size,
                                 workers=args.workers, device=_resolve_device(args.device))
    except ImageFeaturesError as exc:
        raise CaptionerError(str(exc)) from None
    except OSError as exc:  # unwritable --out, disk full: the cache dir, not a traceback
        raise CaptionerError(f"{args.out}: cannot write the feature cache ({exc.strerror or exc})") from None
    seconds = time.perf_counter() - start
    n, length, dim = cache.index["grid_shape"]
    rate = todo / seconds if todo and seconds > 0 else 0.0
    print(f"features: {todo} images encoded in {seconds:.1f} s ({rate:.1f} images/s); "
          f"{args.out}: {n} images x {length} x {dim} ({encoder.name})")
    return 0
