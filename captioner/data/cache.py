"""Feature caches on disk: the format, opening one, and reading its rows, checked.

Layout of a cache directory:

    grid.f16     float16 [N, L, C], raw little-endian C-order bytes
    pooled.f16   float16 [N, C]
    index.json   format_version, fingerprint, encoder_fingerprint, encoder, weights,
                 preprocessing, image_ids, grid_shape, pooled_shape, dtype, done (rows
                 written, in order), failed (rows whose image could not be read), complete,
                 checksums (per row: [crc32 of grid row, crc32 of pooled row], or null)

Three checks keep a damaged or mismatched cache from ever being used:

* Identity. The encoder fingerprint is a sha256 over the encoder name, the exact weights (a
  digest of the state dict), the preprocessing and the feature shape; the cache fingerprint
  adds the ordered image ids. Both are recomputed from the index's own fields on open, so an
  edited index (ids reordered, preprocessing changed) is refused, and a cache matches an
  encoder only by the full fingerprint, never by the encoder's name.
* Rows. Each row's checksums start from the crc32 of its image id, so a row moved to another
  id (two ids swapped in the index, two rows swapped in a data file) fails like a flipped
  byte. Every read (`FeatureCache.get`) checks the rows it returns; a non-finite value is
  refused too (extraction never writes one). `verify` checks a whole cache in one pass.
* Size. Both data files must have exactly the size the index says.

Any failure is a one-line `FeatureCacheError` naming the directory (and the image), saying
that `captioner features` rebuilds or repairs it. Writing caches is `extract.py`'s job.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from captioner.errors import FeatureCacheError, shown_path
from captioner.model.encoder import Features
from captioner.model.preprocessing import Preprocessing

if TYPE_CHECKING:
    from captioner.model.encoder import Encoder

__all__ = [
    "DTYPE", "FORMAT_VERSION", "GRID_FILE", "INDEX_FILE", "POOLED_FILE", "FeatureCache",
    "cache_fingerprint", "check_data_files", "damaged_rows", "encoder_fingerprint",
    "encoder_identity", "index_fingerprints", "non_finite", "read_index", "row_checksums",
]

FORMAT_VERSION = 2
GRID_FILE = "grid.f16"
POOLED_FILE = "pooled.f16"
INDEX_FILE = "index.json"
DTYPE = np.dtype("<f2")  # little-endian float16, whatever the machine
REPAIR = "run `captioner features` again to repair it"
_INDEX_KEYS = {
    "format_version": int, "fingerprint": str, "encoder_fingerprint": str, "encoder": str,
    "weights": str, "preprocessing": dict, "image_ids": list, "grid_shape": list,
    "pooled_shape": list, "dtype": str, "done": int, "failed": list, "complete": bool,
    "checksums": list,
}
_NON_FINITE = 0x7C00  # float16 exponent bits all set: Inf or NaN
_VERIFY_ROWS = 256  # rows read at a time by a verification pass


# ----------------------------------------------------------------------------- fingerprints


def encoder_identity(encoder: Encoder) -> dict[str, Any]:
    """What determines one image's features, as stored in the index."""
    return {"encoder": encoder.name, "weights": encoder.weights_digest(),
            "preprocessing": encoder.preprocessing.to_dict(),
            "feature_shape": [encoder.grid_size, encoder.feature_dim]}


def encoder_fingerprint(encoder: Encoder) -> str:
    """sha256 of the encoder's identity: name, exact weights, preprocessing, feature shape."""
    return _encoder_fingerprint(encoder_identity(encoder))


def cache_fingerprint(encoder: Encoder, image_ids: Sequence[str]) -> str:
    """sha256 identifying a whole cache: the encoder fingerprint plus the ordered image ids."""
    return _fingerprint(encoder_fingerprint(encoder), image_ids)


def index_fingerprints(index: dict[str, Any]) -> tuple[str, str]:
    """(encoder fingerprint, cache fingerprint) recomputed from an index's own fields."""
    identity = {"encoder": index["encoder"], "weights": index["weights"],
                "preprocessing": index["preprocessing"], "feature_shape": index["grid_shape"][1:]}
    encoder_fp = _encoder_fingerprint(identity)
    return encoder_fp, _fingerprint(encoder_fp, index["image_ids"])


def _encoder_fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format_version": FORMAT_VERSION, **identity},
                                     sort_keys=True).encode()).hexdigest()


def _fingerprint(encoder_fp: str, image_ids: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([encoder_fp, list(image_ids)]).encode()).hexdigest()


# ------------------------------------------------------------------------------ checksums


def row_checksums(image_id: str, grid: np.ndarray, pooled: np.ndarray) -> list[int]:
    """[crc32 of the grid row, crc32 of the pooled row], both seeded with the image id."""
    seed = _id_crc(image_id)
    return [zlib.crc32(np.ascontiguousarray(grid, DTYPE), seed),
            zlib.crc32(np.ascontiguousarray(pooled, DTYPE), seed)]


def _id_crc(image_id: str) -> int:
    return zlib.crc32(image_id.encode("utf-8", "surrogatepass"))


def non_finite(rows: np.ndarray) -> np.ndarray:
    """Per row of float16 data: does it hold a NaN or an Inf? (a bit test, no conversion)"""
    if not rows.size:
        return np.zeros(len(rows), bool)
    bits = rows.reshape(len(rows), -1).view(np.uint16)
    if (bits & 0x7FFF).max() < _NON_FINITE:  # the usual case: one pass
        return np.zeros(len(rows), bool)
    return ((bits & _NON_FINITE) == _NON_FINITE).any(axis=1)


# ----------------------------------------------------------------------------- the index


def read_index(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse index.json and check it is whole and consistent with itself; any problem is
    a FeatureCacheError naming it."""
    path = Path(directory) / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureCacheError(f"{shown_path(directory)}: not a feature cache (no {INDEX_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FeatureCacheError(f"{shown_path(path)}: corrupt index ({exc}); rebuild it with "
                                "`captioner features`") from None
    if isinstance(index, dict) and index.get("format_version") != FORMAT_VERSION \
            and isinstance(index.get("format_version"), int):
        raise FeatureCacheError(f"{shown_path(path)}: feature cache format {index['format_version']}, this "
                                f"version reads format {FORMAT_VERSION}; rebuild it with `captioner features`")
    problem = _index_problem(index)
    if problem:
        raise FeatureCacheError(f"{shown_path(path)}: corrupt or edited index ({problem}); rebuild it "
                                "with `captioner features`")
    return index


def _index_problem(index: Any) -> str:
    """What is wrong with a parsed index, or '' when nothing is."""
    if not isinstance(index, dict):
        return "not a JSON object"
    for key, kind in _INDEX_KEYS.items():
        if not isinstance(index.get(key), kind) or (kind is int and isinstance(index[key], bool)):
            return f"{key!r} missing or not {kind.__name__}"
    ids, n = index["image_ids"], len(index["image_ids"])
    grid_shape, pooled_shape = index["grid_shape"], index["pooled_shape"]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in grid_shape + pooled_shape) \
            or len(grid_shape) != 3 or len(pooled_shape) != 2 or grid_shape[0] != n \
            or pooled_shape[0] != n or grid_shape[2] != pooled_shape[1]:
        return "inconsistent shapes"
    if index["dtype"] != DTYPE.str:
        return f"dtype {index['dtype']!r}"
    if not all(isinstance(i, str) for i in ids) or len(set(ids)) != n:
        return "image ids not unique strings"
    if not 0 <= index["done"] <= n:
        return "done out of range"
    try:
        Preprocessing.from_dict(index["preprocessing"])
    except (TypeError, ValueError) as exc:
        return f"preprocessing: {exc}"
    failed = index["failed"]
    if not all(isinstance(f, dict) and isinstance(f.get("row"), int) and 0 <= f["row"] < index["done"]
               and isinstance(f.get("error"), str) for f in failed):
        return "malformed failed list"
    if index["complete"] != (index["done"] == n and not failed):
        return "complete flag contradicts done and failed"
    return _checksums_problem(index) or _fingerprint_problem(index)


def _checksums_problem(index: dict[str, Any]) -> str:
    """One entry per row; every written row that did not fail has [grid crc, pooled crc]."""
    checksums = index["checksums"]
    if len(checksums) != len(index["image_ids"]):
        return "checksums do not match the image ids"
    failed = {f["row"] for f in index["failed"]}
    for row, entry in enumerate(checksums):
        if entry is None and (row >= index["done"] or row in failed):
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**32 for c in entry)):
            return f"no valid checksum for row {row}"
    return ""


def _fingerprint_problem(index: dict[str, Any]) -> str:
    encoder_fp, fingerprint = index_fingerprints(index)
    if index["encoder_fingerprint"] != encoder_fp:
        return "encoder fingerprint does not match the encoder, weights, preprocessing and shape it lists"
    if index["fingerprint"] != fingerprint:
        return "fingerprint does not match the image ids and encoder it lists"
    return ""


def check_data_files(directory: str | os.PathLike[str], index: dict[str, Any]) -> None:
    """Both data files exist at exactly their full size (they are created full size)."""
    for name, shape in ((GRID_FILE, index["grid_shape"]), (POOLED_FILE, index["pooled_shape"])):
        path = Path(directory) / name
        expected = int(np.prod(shape)) * DTYPE.itemsize
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            raise FeatureCacheError(f"{shown_path(path)}: truncated or missing ({actual} bytes, expected "
                                    f"{expected}); rebuild it with `captioner features`")


# ----------------------------------------------------------------------------- row reads


def _read_rows(fd: int, rows: np.ndarray, row_shape: Sequence[int], path: Path) -> np.ndarray:
    """Rows of a data file with positional reads (os.preadv) into one buffer.

    Reading through a memmap would map every touched page into this process: on a COCO-sized
    cache an epoch touches all 15 GB and the pages count toward RSS (and toward a container's
    memory limit). preadv copies the rows and leaves the file pages in the kernel's page
    cache, which is reclaimable; it is also faster than fancy-indexing a memmap.
    """
    out = np.empty((len(rows), *row_shape), DTYPE)
    row_bytes = out[0].nbytes if len(rows) else 0
    for k, row in enumerate(rows):
        if os.preadv(fd, [memoryview(out[k]).cast("B")], int(row) * row_bytes) != row_bytes:
            raise FeatureCacheError(f"{shown_path(path)}: short read at row {row} (truncated?); rebuild it "
                                    "with `captioner features`")
    return out


def _checksum_failures(index: dict[str, Any], rows: np.ndarray, grid: np.ndarray | None,
                       pooled: np.ndarray) -> list[int]:
    """The rows read whose bytes fail their checksum; grid may be None (a pooled-only read
    checks the pooled checksum alone)."""
    checksums, ids = index["checksums"], index["image_ids"]
    failures = []
    for k, row in enumerate(rows.tolist()):
        expected = checksums[row]
        if expected is None:
            continue
        seed = _id_crc(ids[row])
        if zlib.crc32(pooled[k], seed) != expected[1] or (
                grid is not None and zlib.crc32(grid[k], seed) != expected[0]):
            failures.append(row)
    return failures


def _non_finite_rows(rows: np.ndarray, grid: np.ndarray | None, pooled: np.ndarray) -> list[int]:
    bad = non_finite(pooled)
    if grid is not None:
        bad |= non_finite(grid)
    return [int(rows[k]) for k in np.flatnonzero(bad)]


def damaged_rows(directory: str | os.PathLike[str], index: dict[str, Any],
                 rows: Sequence[int] | None = None) -> list[int]:
    """The rows (default: all with a checksum) that fail their checksum or are not finite:
    one pass over the data files, a few hundred rows at a time."""
    directory = Path(directory)
    if rows is None:
        rows = [r for r, c in enumerate(index["checksums"]) if c is not None]
    grid_shape, pooled_shape = index["grid_shape"][1:], index["pooled_shape"][1:]
    damaged: list[int] = []
    grid_fd = os.open(directory / GRID_FILE, os.O_RDONLY)
    pooled_fd = os.open(directory / POOLED_FILE, os.O_RDONLY)
    try:
        for start in range(0, len(rows), _VERIFY_ROWS):
            chunk = np.asarray(rows[start:start + _VERIFY_ROWS], dtype=np.int64)
            grid = _read_rows(grid_fd, chunk, grid_shape, directory / GRID_FILE)
            pooled = _read_rows(pooled_fd, chunk, pooled_shape, directory / POOLED_FILE)
            bad = set(_checksum_failures(index, chunk, grid, pooled)) | set(_non_finite_rows(chunk, grid, pooled))
            damaged += sorted(bad)
    finally:
        os.close(grid_fd)
        os.close(pooled_fd)
    return damaged


# ------------------------------------------------------------------------------ the cache


class FeatureCache:
    """Read-only view of a complete cache; rows are read from disk only when asked for and
    checked on every read."""

    def __init__(self, directory: Path, index: dict[str, Any]) -> None:
        self.directory = directory
        self.index = index
        self.grid_array = np.memmap(directory / GRID_FILE, DTYPE, mode="r", shape=tuple(index["grid_shape"]))
        self.pooled_array = np.memmap(directory / POOLED_FILE, DTYPE, mode="r", shape=tuple(index["pooled_shape"]))
        self._rows = {image_id: i for i, image_id in enumerate(index["image_ids"])}
        self._fds: dict[str, int] = {}  # data file descriptors for preadv, opened on first read
        self._fd_pid: int | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike[str], expected_fingerprint: str | None = None) -> FeatureCache:
        """Open a cache; FeatureCacheError unless it is complete, consistent, of full size and
        (if given) of the expected fingerprint."""
        directory = Path(directory)
        index = read_index(directory)
        if expected_fingerprint is not None and index["fingerprint"] != expected_fingerprint:
            raise FeatureCacheError(
                f"{shown_path(directory)}: stale feature cache (built for other encoder weights, "
                f"preprocessing or images); rebuild it with `captioner features`")
        if not index["complete"]:
            raise FeatureCacheError(
                f"{shown_path(directory)}: incomplete feature cache ({index['done']} of "
                f"{len(index['image_ids'])} rows, {len(index['failed'])} failed); run `captioner features` "
                "again to finish it")
        check_data_files(directory, index)
        return cls(directory, index)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r}, {self.encoder}, grid {tuple(self.index['grid_shape'])})"

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    @property
    def encoder_fingerprint(self) -> str:
        return self.index["encoder_fingerprint"]

    @property
    def encoder(self) -> str:
        return self.index["encoder"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.index["preprocessing"])

    @property
    def image_ids(self) -> list[str]:
        return self.index["image_ids"]

    def matches(self, encoder: Encoder) -> bool:
        """Were these features computed by exactly this encoder (weights, preprocessing)?"""
        return self.encoder_fingerprint == encoder_fingerprint(encoder)

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
        return self.get([i], grid=False).pooled[0]

    def get(self, indices: Sequence[int] | np.ndarray | Tensor, grid: bool = True) -> Features:
        """Rows `indices` as float32 Features([B, L, C] or None, [B, C]); reads only those rows
        and checks them: FeatureCacheError naming the image if one is damaged."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            bad = rows[(rows < 0) | (rows >= n)][0]
            raise IndexError(f"row {bad} out of range for the feature cache {self.directory}")
        pooled = self._read(POOLED_FILE, rows)
        grids = self._read(GRID_FILE, rows) if grid else None
        what = "do not match their checksum"
        bad = _checksum_failures(self.index, rows, grids, pooled)
        if not bad:  # a checksummed row is finite unless written by something else
            what, bad = "are not finite (NaN or Inf)", _non_finite_rows(rows, grids, pooled)
        if bad:
            more = f" (and {len(bad) - 1} more rows of this batch)" if len(bad) > 1 else ""
            raise FeatureCacheError(
                f"{shown_path(self.directory)}: damaged feature cache: the features of "
                f"{self.image_ids[bad[0]]} (row {bad[0]}) {what}{more}; {REPAIR}")
        return Features(grid=None if grids is None else torch.from_numpy(grids).float(),
                        pooled=torch.from_numpy(pooled).float())

    def verify(self) -> list[int]:
        """Every row checked in one pass; returns the damaged rows (empty when intact)."""
        return damaged_rows(self.directory, self.index)

    def _read(self, name: str, rows: np.ndarray) -> np.ndarray:
        shape = self.grid_array.shape[1:] if name == GRID_FILE else self.pooled_array.shape[1:]
        return _read_rows(self._fd(name), rows, shape, self.directory / name)

    def _fd(self, name: str) -> int:
        """The descriptor of a data file, opened lazily per process, so a cache pickled into
        DataLoader workers opens its own."""
        if self._fd_pid != os.getpid():
            self._fds, self._fd_pid = {}, os.getpid()
        if name not in self._fds:
            self._fds[name] = os.open(self.directory / name, os.O_RDONLY)
        return self._fds[name]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_fd_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_fd_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
