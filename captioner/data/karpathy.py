"""Karpathy's split files (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json).

Each entry is one image with all its sentences, so an image listed twice is an error (it
names both entries and both splits); sentences that repeat one another are kept.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from captioner.data.formats import caption, json_list, json_str, read_json, require_file
from captioner.data.records import Record, finish, image_name, split_in_file
from captioner.errors import DatasetError

__all__ = ["read_karpathy", "read_karpathy_root"]


def read_karpathy(
    json_path: str | Path,
    image_root: str | Path,
    *,
    splits: Sequence[str] | None = None,
    skip_missing: bool = False,
) -> list[Record]:
    """Karpathy's split files (dataset_flickr8k/flickr30k/coco.json).

    Uses the `raw` sentences (tokenisation is ours to do), finds images at
    image_root/filepath/filename, maps "val" to "dev" and keeps "restval" as its own split.
    """
    json_path = require_file(Path(json_path), f"{json_path}: no such file")
    entries = json_list(read_json(json_path), "images", json_path)
    root = Path(image_root)
    records: dict[str, tuple[int, Record]] = {}
    for i, entry in enumerate(entries):
        where = f"{json_path}: images[{i}]"
        raw = json_str(entry, "filename", where)
        where = f"{where} ({raw})"
        name = image_name(raw, where, root)
        split = split_in_file(json_str(entry, "split", where), where)
        if name in records:
            first, other = records[name]
            both = "" if other.split == split else \
                f": one image in two splits, {other.split or 'none'} and {split or 'none'}"
            raise DatasetError(f"{where}: image listed twice (also images[{first}]{both})")
        sentences = json_list(entry, "sentences", where)
        captions = tuple(caption(json_str(s, "raw", f"{where} sentences[{j}]"), f"{where} sentences[{j}]")
                         for j, s in enumerate(sentences))
        if not captions:
            raise DatasetError(f"{where}: no sentences")
        folder = entry.get("filepath") or ""
        if not isinstance(folder, str):
            raise DatasetError(f"{where}: expected a string under 'filepath'")
        path = image_name(os.path.join(folder, name), where, root)
        records[name] = (i, Record(name, root / path, captions, split))
    return finish([record for _, record in records.values()], json_path, splits, skip_missing)


def read_karpathy_root(root: Path, splits: Sequence[str] | None, skip_missing: bool) -> list[Record]:
    """root: a dataset_*.json file, or the directory holding exactly one (and images/)."""
    if root.is_dir():
        found = sorted(root.glob("dataset_*.json"))
        if len(found) != 1:
            what = "no dataset_*.json" if not found else \
                f"several dataset_*.json ({', '.join(p.name for p in found)}); pass one"
            raise DatasetError(f"{root}: {what}")
        json_path = found[0]
    elif root.is_file():
        json_path = root
    else:
        raise DatasetError(f"{root}: no such file or directory")
    images = json_path.parent / "images"
    image_root = images if images.is_dir() else json_path.parent
    return read_karpathy(json_path, image_root, splits=splits, skip_missing=skip_missing)
