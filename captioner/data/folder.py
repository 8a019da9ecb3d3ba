"""Your own images: a folder holding the images and captions.jsonl or captions.csv.

What counts as a duplicate. One-caption rows (`"caption"` in JSON Lines, every CSV row) are
one caption each: several rows for one image are its several captions, even with the same
text (annotators do write the same sentence), and they merge with the image's `"captions"`
list if it has one. A `"captions"` list is the image's entry: a second list line for the
same image is a repeated entry (two files pasted together) and is refused, naming both
lines. A row may leave the split out (the image's split is then the one its other rows
give); an image given two different splits is refused, naming both lines.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from captioner.data.formats import CaptionRow, read_csv_captions, read_jsonl_captions, require_dir
from captioner.data.records import Record, describe_split, finish
from captioner.errors import DatasetError

__all__ = ["read_folder"]


def read_folder(
    root: str | Path, *, splits: Sequence[str] | None = None, skip_missing: bool = False
) -> list[Record]:
    """Your own images: root/ holding the images and captions.jsonl or captions.csv.

    captions.jsonl lines are {"image": name, "caption": str} or {"image": name, "captions":
    [...]}; captions.csv has an `image,caption` header. Names are relative to root (and must
    stay inside it); one-caption rows for one image merge; an optional "split" field/column
    assigns splits.
    """
    root = require_dir(root, "image folder")
    jsonl, table = root / "captions.jsonl", root / "captions.csv"
    if jsonl.is_file() and table.is_file():
        raise DatasetError(f"{root}: both captions.jsonl and captions.csv exist; keep one")
    if jsonl.is_file():
        rows, source = read_jsonl_captions(jsonl, root), jsonl
    elif table.is_file():
        rows, source = read_csv_captions(table, root, with_split=True), table
    else:
        raise DatasetError(f"{root}: no captions.jsonl or captions.csv")
    captions: dict[str, list[str]] = {}
    split_of: dict[str, CaptionRow] = {}  # image -> the first row that gives its split
    lists: dict[str, int] = {}  # image -> line of its "captions" list
    for row in rows:
        seen = split_of.setdefault(row.image, row) if row.split else split_of.get(row.image, row)
        if row.split and row.split != seen.split:
            raise DatasetError(f"{source}:{row.line}: {row.image} is in {describe_split(row.split)} here but in "
                               f"{describe_split(seen.split)} on line {seen.line} (one image in two splits)")
        if row.listed and lists.setdefault(row.image, row.line) != row.line:
            raise DatasetError(f"{source}:{row.line}: repeated entry: {row.image} already has a \"captions\" "
                               f"list on line {lists[row.image]}")
        captions.setdefault(row.image, []).append(row.caption)
    records = [Record(name, root / name, tuple(caps), split_of[name].split if name in split_of else "")
               for name, caps in captions.items()]
    return finish(records, source, splits, skip_missing)
