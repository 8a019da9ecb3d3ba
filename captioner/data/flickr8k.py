"""Flickr8k as published (Flickr8k.token.txt and the three split lists) and as Kaggle ships
it (captions.txt, a CSV, with the split lists when they sit beside it).

What counts as a duplicate: in the token file a key (`image#n`) names one caption, so a key
given twice is an error; one caption text twice under two keys is legitimate (annotators
sometimes wrote the same sentence: 10 images of the real data). Kaggle's CSV has no keys:
every row is one caption. A split list names an image once; an image in two lists (two
splits) is an error.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from captioner.data.formats import caption, lines, read_csv_captions, require_dir, require_file
from captioner.data.records import Record, count, examples, finish, image_name, warn
from captioner.errors import DatasetError

__all__ = ["FLICKR8K_SPLIT_FILES", "FLICKR8K_TOKENS", "read_flickr8k", "read_flickr8k_kaggle"]

FLICKR8K_TOKENS = "Flickr8k.token.txt"
FLICKR8K_SPLIT_FILES = {split: f"Flickr_8k.{split}Images.txt" for split in ("train", "dev", "test")}
# A key in the official token file with no image behind it (a duplicate of 2258277193_586949ec62).
_BOGUS_KEYS = frozenset({"2258277193_586949ec62.jpg.1"})
_TOKEN_LINE = re.compile(r"(?P<image>[^\t]+)#(?P<index>\d+)\t(?P<caption>.*)")


def read_flickr8k(
    root: str | Path, *, splits: Sequence[str] | None = None, skip_missing: bool = False
) -> list[Record]:
    """Flickr8k as published: Flickr8k.token.txt plus the three official split lists.

    The bogus key is dropped with a counted warning. Captioned images that are in no split
    list (91 in the real data) are kept with split "" when every split is asked for (so
    `captioner features` covers all 8,091 images) and filtered out when splits are named,
    so `splits=["train", "dev", "test"]` is exactly the 6000/1000/1000 split.
    """
    root = require_dir(root, "Flickr8k")
    tokens = require_file(root / FLICKR8K_TOKENS, f"{root}: not a Flickr8k directory (no {FLICKR8K_TOKENS})")
    image_dir = _find_image_dir(root, ("images", "Flicker8k_Dataset", "Flickr8k_Dataset"))
    split_of = _read_split_lists(root, image_dir, required=True)
    return _assemble(_read_token_file(tokens, image_dir), split_of, image_dir, tokens, splits, skip_missing)


def read_flickr8k_kaggle(
    root: str | Path, *, splits: Sequence[str] | None = None, skip_missing: bool = False
) -> list[Record]:
    """Kaggle's Flickr8k: captions.txt (CSV `image,caption`) and Images/.

    The official split lists are used when they sit in the same directory; without them
    every record has split "".
    """
    root = require_dir(root, "Flickr8k (Kaggle)")
    table = require_file(root / "captions.txt", f"{root}: not a Kaggle Flickr8k directory (no captions.txt)")
    image_dir = _find_image_dir(root, ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset"))
    split_of = _read_split_lists(root, image_dir, required=False)
    captions: dict[str, list[str]] = {}
    for row in read_csv_captions(table, image_dir):
        captions.setdefault(row.image, []).append(row.caption)
    return _assemble(captions, split_of, image_dir, table, splits, skip_missing)


def _assemble(
    captions: dict[str, list[str]],
    split_of: dict[str, str] | None,
    image_dir: Path,
    source: Path,
    splits: Sequence[str] | None,
    skip_missing: bool,
) -> list[Record]:
    """Captions + split lists -> records, dropping (and counting) the bogus key."""
    bogus = [name for name in captions if name in _BOGUS_KEYS]
    if bogus:
        warn(f"{source}: skipped {count(bogus, 'known bogus key')} with no image: {examples(bogus)}")
    unlisted = [name for name in captions
                if split_of is not None and name not in split_of and name not in _BOGUS_KEYS]
    if unlisted and splits is None:
        # Asked for everything (e.g. `captioner features`): keep them, with no split.
        warn(f"{source}: kept {count(unlisted, 'captioned image')} in no split list with no split: "
             f"{examples(unlisted)}")
    if split_of is not None:
        uncaptioned = sorted(set(split_of) - set(captions))
        if uncaptioned:
            raise DatasetError(f"{source}: {count(uncaptioned, 'image')} in the split lists "
                               f"have no captions: {examples(uncaptioned)}")
    records = [Record(name, image_dir / name, tuple(caps), split_of.get(name, "") if split_of is not None else "")
               for name, caps in captions.items() if name not in _BOGUS_KEYS]
    return finish(records, source, splits, skip_missing)


def _read_token_file(path: Path, image_dir: Path) -> dict[str, list[str]]:
    """Flickr8k.token.txt: `<image>#<n><TAB><caption>` per line -> {image: [captions]};
    a key given twice is an error naming both lines."""
    captions: dict[str, list[str]] = {}
    first_seen: dict[tuple[str, int], int] = {}
    for line_no, line in lines(path):
        if not line.strip():
            continue
        match = _TOKEN_LINE.fullmatch(line)
        where = f"{path}:{line_no}"
        if match is None:
            raise DatasetError(rf"{where}: expected '<image>#<n>\t<caption>'")
        name = image_name(match["image"], where, image_dir)
        key = (name, int(match["index"]))
        if key in first_seen:
            raise DatasetError(f"{where}: duplicate key {name}#{key[1]} (first on line {first_seen[key]})")
        first_seen[key] = line_no
        captions.setdefault(name, []).append(caption(match["caption"], where))
    if not captions:
        raise DatasetError(f"{path}: no captions")
    return captions


def _read_split_lists(root: Path, image_dir: Path, required: bool) -> dict[str, str] | None:
    """The official split lists -> {image: split}; None when absent and not required. An
    image listed twice, in one list or in two, is an error naming both places."""
    paths = {split: root / name for split, name in FLICKR8K_SPLIT_FILES.items()}
    present = [p for p in paths.values() if p.is_file()]
    if not present and not required:
        return None
    if len(present) < len(paths):
        absent = [p.name for p in paths.values() if not p.is_file()]
        raise DatasetError(f"{root}: missing split list(s) {', '.join(absent)}")
    split_of: dict[str, str] = {}
    first: dict[str, str] = {}  # image -> "file:line" where it was first listed
    for split, path in paths.items():
        for line_no, line in lines(path):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            name = image_name(line.strip(), where, image_dir)
            if name in split_of and split_of[name] == split:
                raise DatasetError(f"{where}: duplicate image {name} (first on line {first[name].rsplit(':', 1)[1]})")
            if name in split_of:
                raise DatasetError(f"{where}: {name} is also listed in {first[name]} (one image in two "
                                   f"splits: {split_of[name]} and {split})")
            split_of[name], first[name] = split, f"{path.name}:{line_no}"
    return split_of


def _find_image_dir(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"{root}: no image directory (looked for {', '.join(names)})")
