"""Datasets by name: every caption source on disk becomes a sorted list of `Record`s.

Training, feature caching and evaluation only ever see `Record`s, so supporting a new dataset
means writing one reader module (flickr8k.py, karpathy.py, coco.py, folder.py) and naming it
here. The readers are strict on purpose: a malformed line, an empty caption, a repeated key
or entry, an image in two splits, an image name outside the dataset's folder, or a caption
for a missing image stops the run with a one-line `DatasetError` naming the file (and line)
instead of quietly training on something else. What a reader drops or keeps on purpose
(Flickr8k's bogus key, missing images under `skip_missing=True`, captioned images in no
split list) is counted in a `DatasetWarning`. The checks every reader shares are in
records.py; layouts are described in data/README.md.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from captioner.data.coco import read_coco, read_coco_root
from captioner.data.flickr8k import read_flickr8k, read_flickr8k_kaggle
from captioner.data.folder import read_folder
from captioner.data.karpathy import read_karpathy, read_karpathy_root
from captioner.data.records import SPLITS, DatasetWarning, Record, parse_split
from captioner.errors import DatasetError

__all__ = [
    "DATASETS", "SPLITS", "DatasetError", "DatasetWarning", "Record", "parse_split", "read_coco",
    "read_dataset", "read_flickr8k", "read_flickr8k_kaggle", "read_folder", "read_karpathy",
]


def _flickr8k(root: Path, splits: Sequence[str] | None, skip: bool) -> list[Record]:
    return read_flickr8k(root, splits=splits, skip_missing=skip)


def _flickr8k_kaggle(root: Path, splits: Sequence[str] | None, skip: bool) -> list[Record]:
    return read_flickr8k_kaggle(root, splits=splits, skip_missing=skip)


def _folder(root: Path, splits: Sequence[str] | None, skip: bool) -> list[Record]:
    return read_folder(root, splits=splits, skip_missing=skip)


DATASETS: dict[str, Callable[[Path, Sequence[str] | None, bool], list[Record]]] = {
    "flickr8k": _flickr8k,
    "flickr8k-kaggle": _flickr8k_kaggle,
    "karpathy": read_karpathy_root,
    "coco": read_coco_root,
    "folder": _folder,
}


def read_dataset(
    name: str,
    root: str | Path,
    splits: Sequence[str] | None = None,
    skip_missing: bool = False,
) -> list[Record]:
    """Read dataset `name` (a key of DATASETS) from `root`, optionally only some splits.

    `skip_missing=True` drops records whose image file is absent (with a counted warning)
    instead of refusing the dataset. An empty result is an error: it is never what you meant.
    """
    try:
        reader = DATASETS[name.lower()]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None
    return reader(Path(root), splits, skip_missing)
