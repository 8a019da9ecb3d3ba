"""What every dataset reader produces, and the checks all of them share.

A reader makes `Record`s of files; the checks here make those records safe to train and
evaluate on whatever the files say:

* One spelling per image. Image names from a file are normalised (`os.path.normpath` of the
  name relative to the dataset's image folder), so `x.jpg`, `./x.jpg` and `.//x.jpg` are one
  image, never three; a name that leaves the folder (`../x.jpg`, an absolute path elsewhere)
  is refused, naming the file and line. The check is on names; links inside the folder are
  not followed.
* One split per image. Two records of one image (by id or by file) are refused, so no photo
  can sit in both train and test.
* No silent loss. Missing image files are refused, or dropped with a counted warning when
  asked to (`skip_missing`).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.errors import DatasetError, shown_path

__all__ = ["SPLITS", "DatasetWarning", "Record", "count", "describe_split", "examples", "finish", "image_name",
           "parse_split", "parse_splits", "split_in_file", "warn"]

# "" marks a record whose split the source does not say (a plain folder, Kaggle without lists).
SPLITS = ("train", "dev", "test", "restval")
_SPLIT_ALIASES = {"val": "dev", "valid": "dev", "validation": "dev"}
_EXAMPLES = 3  # how many offending names an error or warning quotes


class DatasetWarning(UserWarning):
    """Something a reader dropped on purpose, with a count, so it is never silent."""


@dataclass(frozen=True)
class Record:
    """One image and all of its reference captions (whitespace-normalised, otherwise raw)."""

    image_id: str
    path: Path
    captions: tuple[str, ...]
    split: str  # one of SPLITS, or "" when the source has no split


# --- splits ---------------------------------------------------------------------------------

def _known_split(value: str) -> str | None:
    split = value.strip().lower()
    split = _SPLIT_ALIASES.get(split, split)
    return split if split in (*SPLITS, "") else None


def parse_split(name: str) -> str:
    """A split name as a user types it -> one of SPLITS ("val" means "dev"; "" means the
    records with no split); DatasetError for anything else."""
    split = _known_split(name) if isinstance(name, str) else None
    if split is None:
        raise DatasetError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")
    return split


def parse_splits(splits: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """parse_split over a list of names (one name alone is a list of one); None is all."""
    if splits is None:
        return None
    return tuple(parse_split(s) for s in ([splits] if isinstance(splits, str) else splits))


def split_in_file(value: Any, where: str) -> str:
    """A split as a dataset file spells it; errors name the place (`file:line`)."""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: split must be a string, got {value!r}")
    split = _known_split(value)
    if split is None:
        raise DatasetError(f"{where}: unknown split {value!r} (expected one of {', '.join(SPLITS)})")
    return split


def describe_split(split: str) -> str:
    return f"split {split!r}" if split else "no split"


# --- image names ----------------------------------------------------------------------------

def image_name(raw: str, where: str, folder: Path) -> str:
    """The normalised name of an image file relative to `folder`, as read at `where`.

    `./x.jpg`, `.//x.jpg` and `sub/../x.jpg` are all `x.jpg`; an absolute name inside the
    folder becomes relative to it. A name that points outside the folder, or that names no
    file, is a DatasetError naming `where`.
    """
    if not raw or "\0" in raw:
        raise DatasetError(f"{where}: {'empty image name' if not raw else 'image name holds a NUL byte'}")
    name = raw
    if os.path.isabs(name):
        name = _inside(name, folder)
        if name is None:
            raise DatasetError(f"{where}: image {raw!r} is outside the image folder {shown_path(folder)} "
                               "(names are relative to it)")
    name = os.path.normpath(name)
    if name == os.pardir or name.startswith(os.pardir + os.sep):
        raise DatasetError(f"{where}: image {raw!r} points outside the image folder {shown_path(folder)}")
    if name == os.curdir:
        raise DatasetError(f"{where}: {raw!r} is not an image file name")
    return name


def _inside(path: str, folder: Path) -> str | None:
    """`path` relative to `folder` when it lies inside it (by name, then with links
    resolved, so a folder reached through a symlink still matches), else None."""
    for resolve in (os.path.abspath, os.path.realpath):
        relative = os.path.relpath(resolve(path), resolve(folder))
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return relative
    return None


# --- assembling records ---------------------------------------------------------------------

def finish(records: list[Record], source: Path, splits: Sequence[str] | None,
           skip_missing: bool) -> list[Record]:
    """Check every image is one record, keep the wanted splits, check the images exist,
    and sort by image id."""
    _check_unique(records, source)
    wanted = parse_splits(splits)
    if wanted is not None:
        available = _split_counts(records)
        records = [r for r in records if r.split in wanted]
        if not records:
            raise DatasetError(f"{source}: no records in split(s) {', '.join(wanted)} "
                               f"(available: {available or 'none'})")
    records = _drop_missing(records, source, skip_missing)
    if not records:
        raise DatasetError(f"{source}: no captioned images")
    return sorted(records, key=lambda r: r.image_id)


def _check_unique(records: list[Record], source: Path) -> None:
    """The readers key records by image, so this holds unless two names reach one file
    (a Karpathy filepath and filename split differently): refused, since one photo would
    then count twice, possibly in two splits."""
    first: dict[Path, Record] = {}
    for record in records:
        other = first.setdefault(record.path, record)
        if other is not record:
            raise DatasetError(
                f"{source}: {other.image_id} ({describe_split(other.split)}) and {record.image_id} "
                f"({describe_split(record.split)}) are the same image file {shown_path(record.path)}")


def _drop_missing(records: list[Record], source: Path, skip_missing: bool) -> list[Record]:
    """Refuse (or with skip_missing drop, counted) records whose image file is absent."""
    listings: dict[Path, set[str]] = {}
    missing = [r for r in records if r.path.name not in _listing(r.path.parent, listings)]
    if not missing:
        return records
    names = [str(r.path) for r in missing]
    message = (f"{source}: {len(missing)} of {count(records, 'captioned image')} "
               f"missing on disk: {examples(names)}")
    if not skip_missing:
        raise DatasetError(f"{message} (--skip-missing or skip_missing=True drops them)")
    warn(f"{message}; skipped")
    absent = {r.image_id for r in missing}
    return [r for r in records if r.image_id not in absent]


def _listing(directory: Path, cache: dict[Path, set[str]]) -> set[str]:
    """File names in `directory`, one scandir per directory: 8,091 stats would be slow on NFS."""
    if directory not in cache:
        try:
            with os.scandir(directory) as entries:
                cache[directory] = {e.name for e in entries if not e.is_dir()}
        except OSError:  # absent or unreadable: then every image in it is missing
            cache[directory] = set()
    return cache[directory]


def _split_counts(records: Iterable[Record]) -> str:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.split] = counts.get(record.split, 0) + 1
    return ", ".join(f"{split or 'unsplit'} ({n})" for split, n in counts.items())


# --- messages -------------------------------------------------------------------------------

def count(items: Sequence[Any], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def examples(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_EXAMPLES])
    return f"{shown}, ..." if len(names) > _EXAMPLES else shown


def warn(message: str) -> None:
    warnings.warn(message, DatasetWarning, stacklevel=3)
