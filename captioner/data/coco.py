"""COCO's official captions files (captions_train2014.json, captions_val2014.json, ...).

What counts as a duplicate: an image id or a file name listed twice under "images", an
annotation id given twice, and an image in both the train and the val file (two splits) are
errors; two annotations with the same caption text for one image are kept (annotators do
write the same sentence).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from captioner.data.formats import caption, json_int, json_list, json_str, read_json, require_dir, require_file
from captioner.data.records import Record, count, examples, finish, image_name, parse_splits, split_in_file, warn
from captioner.errors import DatasetError

__all__ = ["read_coco", "read_coco_root"]


def read_coco(
    captions_json: str | Path,
    image_dir: str | Path,
    split: str,
    *,
    skip_missing: bool = False,
) -> list[Record]:
    """One official COCO captions file, all given `split`.

    Images without any caption are dropped with a counted warning.
    """
    captions_json = require_file(Path(captions_json), f"{captions_json}: no such file")
    split = split_in_file(split, str(captions_json))
    data = read_json(captions_json)
    directory = Path(image_dir)
    names: dict[int, str] = {}
    first: dict[str, int] = {}  # file name -> position in "images"
    for i, image in enumerate(json_list(data, "images", captions_json)):
        where = f"{captions_json}: images[{i}]"
        image_id = json_int(image, "id", where)
        name = image_name(json_str(image, "file_name", where), where, directory)
        if image_id in names:
            raise DatasetError(f"{where}: image id {image_id} listed twice")
        if name in first:
            raise DatasetError(f"{where}: {name} listed twice (also images[{first[name]}])")
        names[image_id], first[name] = name, i
    captions: dict[str, list[str]] = {name: [] for name in sorted(names.values())}
    notes: set[int] = set()
    for i, note in enumerate(json_list(data, "annotations", captions_json)):
        where = f"{captions_json}: annotations[{i}]"
        image_id = json_int(note, "image_id", where)
        if image_id not in names:
            raise DatasetError(f"{where}: image_id {image_id} is not in 'images'")
        if "id" in note:
            note_id = json_int(note, "id", where)
            if note_id in notes:
                raise DatasetError(f"{where}: annotation id {note_id} listed twice")
            notes.add(note_id)
        captions[names[image_id]].append(caption(json_str(note, "caption", where), where))
    uncaptioned = [name for name, caps in captions.items() if not caps]
    if uncaptioned:
        warn(f"{captions_json}: skipped {count(uncaptioned, 'image')} without captions: {examples(uncaptioned)}")
    records = [Record(name, directory / name, tuple(caps), split) for name, caps in captions.items() if caps]
    return finish(records, captions_json, None, skip_missing)


def read_coco_root(root: Path, splits: Sequence[str] | None, skip_missing: bool) -> list[Record]:
    """root holds annotations/captions_{train,val}YEAR.json and the train/valYEAR folders."""
    root = require_dir(root, "COCO")
    files = sorted({*root.glob("annotations/captions_*.json"), *root.glob("captions_*.json")})
    parts = {p: p.stem.removeprefix("captions_") for p in files}
    by_split = {p: "train" if part.startswith("train") else "dev"
                for p, part in parts.items() if part.startswith(("train", "val"))}
    years = {re.sub(r"\D", "", parts[p]) for p in by_split}
    if not by_split:
        raise DatasetError(f"{root}: no annotations/captions_train*.json or captions_val*.json")
    if len(years) > 1:
        raise DatasetError(f"{root}: captions for several years ({', '.join(sorted(years))}); "
                           "point root at one year's files or call read_coco")
    wanted = parse_splits(splits)
    chosen = {p: split for p, split in by_split.items() if wanted is None or split in wanted}
    if not chosen:
        raise DatasetError(f"{root}: no captions file for split(s) {', '.join(wanted or ())} "
                           "(COCO has train and dev; Karpathy's test split needs 'karpathy')")
    records: list[Record] = []
    source: dict[str, Path] = {}
    for path, split in chosen.items():
        folder = root / parts[path]
        image_dir = folder if folder.is_dir() else root / "images" / parts[path]
        for record in read_coco(path, image_dir, split, skip_missing=skip_missing):
            if record.image_id in source:
                raise DatasetError(f"{path}: {record.image_id} is also in {source[record.image_id]} "
                                   f"(one image in two splits, {by_split[source[record.image_id]]} and {split})")
            source[record.image_id] = path
            records.append(record)
    return sorted(records, key=lambda r: r.image_id)
