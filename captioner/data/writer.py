"""Encoding images into a cache's rows: decoding in DataLoader workers, encoding in
CPU-friendly chunks, writing whole batches with their checksums, and committing each batch to
index.json only after its rows are flushed (what makes extraction resumable).

Work is always done in the batches an uninterrupted run would use (rows [k * batch_size,
(k + 1) * batch_size)), so with the same batch size, device and thread settings a resumed or
repaired cache is byte-identical to an uninterrupted run. Why that matters: CPU kernels round
differently for different batch shapes; lite0 features of the same images encoded 4 at a
time vs 64 at a time differ by one float16 step in ~0.1% of values. A row whose features are
not finite is never written: it is an error for that image, like an unreadable file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from captioner.data.cache import DTYPE, GRID_FILE, INDEX_FILE, POOLED_FILE, non_finite, row_checksums
from captioner.errors import ImageLoadError, shown_path
from captioner.model.encoder import Encoder, Features
from captioner.model.preprocessing import Preprocessing
from captioner.outputs import atomic_write, atomic_write_text

__all__ = ["CPU_CHUNK", "ImageRows", "aligned_batches", "create_files", "default_threads", "encode_batch",
           "intra_op_threads", "write_index", "write_rows"]

# On CPU a batch is encoded a few images at a time. Big batches' activations exceed glibc's
# mmap threshold (32 MB at most), so each forward pass maps fresh pages and faults them in:
# measured on efficientnet-lite0, one thread, per image: batch 64 = 33 ms computing + 90 ms in
# the kernel; batch 16 = 33 + 35; batch 4 = 30 + 8-15. Chunks of 4 stay on the reused heap.
CPU_CHUNK = 4


class ImageRows(Dataset):
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
        from captioner.images import load_image

        row = self.rows[k]
        try:
            image = load_image(self.paths[row], draft_size=self.draft_size)
            return row, self.transform(image), ""
        except ImageLoadError as exc:
            return row, torch.zeros(3, self.size, self.size), str(exc)


def encode_batch(encoder: Encoder, images: Tensor, device: torch.device) -> Features:
    """Encoder over one batch; on CPU in chunks of CPU_CHUNK (see above), which also makes
    every batch size that is a multiple of it give the same bytes."""
    chunk = CPU_CHUNK if device.type == "cpu" else len(images)
    parts = [encoder(x.to(device, non_blocking=True)) for x in images.split(chunk)]
    return Features(torch.cat([p.grid for p in parts]), torch.cat([p.pooled for p in parts]))


def default_threads(workers: int) -> int:
    """Intra-op threads for CPU extraction: the CPUs not taken by decoding workers, at least 1.

    Measured on a 2-CPU machine shared with other jobs, 2 decoding workers: 1 thread 12.6-14.8
    images/s, 2 threads 2.6-4.4 (with more runnable threads than cores, OpenMP threads
    spin at every barrier waiting for a descheduled peer).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus - workers)


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch.set_num_threads(n) for the duration (it is process-wide), then restore."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def aligned_batches(needed: Sequence[int], batch_size: int, n: int) -> list[int]:
    """The whole uninterrupted-run batches holding the needed rows, in order: encoding those
    exact batches is what makes a resumed or repaired cache byte-identical."""
    first_rows = sorted({row - row % batch_size for row in needed})
    return [row for first in first_rows for row in range(first, min(first + batch_size, n))]


def create_files(directory: Path, index: dict[str, Any]) -> None:
    """Fresh cache: drop the old index first (old data must never pair with it), then create
    both data files at full size, zero-filled (sparse), then the index with done = 0.

    New files replace the old ones by rename rather than truncation, so a reader that still
    maps the old files keeps valid (old) pages instead of crashing with SIGBUS.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INDEX_FILE).unlink(missing_ok=True)
    for name, shape in ((GRID_FILE, index["grid_shape"]), (POOLED_FILE, index["pooled_shape"])):
        size = int(np.prod(shape)) * DTYPE.itemsize
        atomic_write(directory / name, lambda tmp, size=size: os.truncate(tmp, size))
    write_index(directory, index)


def write_index(directory: Path, index: dict[str, Any]) -> None:
    """Replace index.json atomically: a reader sees the old or the new index, never half."""
    atomic_write_text(directory / INDEX_FILE, json.dumps(index))


def write_rows(encoder: Encoder, paths: list[Path], index: dict[str, Any], needed: Sequence[int], directory: Path,
               batch_size: int, workers: int, device: torch.device, progress: bool) -> None:
    """The batch loop: encode whole batches, write the needed rows, flush, then commit
    `done`, `failed` and the checksums in the index."""
    from tqdm.auto import tqdm

    batches = aligned_batches(needed, batch_size, len(paths))
    wanted = set(needed)
    grid = np.memmap(directory / GRID_FILE, DTYPE, mode="r+", shape=tuple(index["grid_shape"]))
    pooled = np.memmap(directory / POOLED_FILE, DTYPE, mode="r+", shape=tuple(index["pooled_shape"]))
    loader = DataLoader(ImageRows(paths, batches, encoder.preprocessing), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    failed = {f["row"]: f for f in index["failed"]}
    was_training = encoder.training
    encoder.eval().to(device)  # eval: fixed BatchNorm statistics, no dropout: deterministic
    bar = tqdm(total=len(paths), initial=len(paths) - len(wanted), unit="img",
               desc=f"features {encoder.name}", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for rows, images, errors in loader:
                keep = np.array([row in wanted for row in rows.tolist()])
                feats = encode_batch(encoder, images, device)
                written = _write_batch(grid, pooled, rows.numpy()[keep], _select(feats, keep),
                                       [e for e, k in zip(errors, keep) if k], paths, index["image_ids"])
                grid.flush()
                pooled.flush()
                _commit(index, written, paths, failed)
                write_index(directory, index)
                bar.update(len(written))
    finally:
        bar.close()
        encoder.train(was_training)
        del grid, pooled


def _select(feats: Features, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kept rows of a batch's features, as the float16 the cache stores."""
    mask = torch.from_numpy(keep)
    return (feats.grid[mask.to(feats.grid.device)].to("cpu", torch.float16).numpy(),
            feats.pooled[mask.to(feats.pooled.device)].to("cpu", torch.float16).numpy())


def _write_batch(grid: np.memmap, pooled: np.memmap, rows: np.ndarray, feats: tuple[np.ndarray, np.ndarray],
                 errors: Sequence[str], paths: list[Path], ids: list[str]) -> list[_Written]:
    """float16 rows into the memmaps, with their checksums. An unreadable image's row, and
    one whose features are not finite (NaN, or beyond float16's range), is zeros and failed."""
    g, p = feats
    if g.shape[1:] != grid.shape[1:]:
        raise ValueError(f"encoder produced grid {g.shape[1:]}, cache expects "
                         f"{grid.shape[1:]}: images not preprocessed to the spec size?")
    errors = list(errors)
    for k in np.flatnonzero(non_finite(g) | non_finite(p)):
        if not errors[k]:
            errors[k] = (f"{shown_path(paths[rows[k]])}: the encoder's features are not finite "
                         "(NaN or Inf); check the encoder weights")
    bad = np.array([bool(e) for e in errors], dtype=bool)
    g[bad] = 0
    p[bad] = 0
    grid[rows] = g
    pooled[rows] = p
    return [_Written(int(row), error, None if error else row_checksums(ids[row], g[k], p[k]))
            for k, (row, error) in enumerate(zip(rows.tolist(), errors))]


@dataclass
class _Written:
    """One row written by a batch: its error (unreadable image) or its checksums."""

    row: int
    error: str
    checksums: list[int] | None


def _commit(index: dict[str, Any], written: list[_Written], paths: list[Path],
            failed: dict[int, dict[str, Any]]) -> None:
    """Advance `done` past this batch, record each row's checksums or failure (retried rows
    may now pass), and say whether the cache is complete."""
    if not written:
        return
    for w in written:
        index["checksums"][w.row] = w.checksums
        if w.error:
            failed[w.row] = {"row": w.row, "image_id": index["image_ids"][w.row], "path": str(paths[w.row]),
                             "error": w.error}
        else:
            failed.pop(w.row, None)
    index["done"] = max(index["done"], max(w.row for w in written) + 1)
    index["failed"] = [failed[r] for r in sorted(failed)]
    index["complete"] = index["done"] == len(index["image_ids"]) and not failed
