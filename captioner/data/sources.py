"""Dataset readers: every caption source on disk becomes a sorted list of `Record`s.

Training, feature caching and evaluation only ever see `Record`s, so supporting a new dataset
means writing one reader here. The readers are strict on purpose: a malformed line, an empty
caption, a duplicate in a split list or a caption for a missing image stops the run with
`DatasetError` naming the file (and line) instead of quietly training on something else.
What a reader drops or keeps on purpose (Flickr8k's bogus key, missing images under
`skip_missing=True`, captioned images in no split list) is counted in a `DatasetWarning`.

Layouts are described in data/README.md.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATASETS", "SPLITS", "DatasetError", "DatasetWarning", "Record", "read_coco",
    "read_dataset", "read_flickr8k", "read_flickr8k_kaggle", "read_folder", "read_karpathy",
]

# "" marks a record whose split the source does not say (a plain folder, Kaggle without lists).
SPLITS = ("train", "dev", "test", "restval")
_SPLIT_ALIASES = {"val": "dev", "valid": "dev", "validation": "dev"}

FLICKR8K_TOKENS = "Flickr8k.token.txt"
FLICKR8K_SPLIT_FILES = {split: f"Flickr_8k.{split}Images.txt" for split in ("train", "dev", "test")}
# A key in the official token file with no image behind it (a duplicate of 2258277193_586949ec62).
_BOGUS_KEYS = frozenset({"2258277193_586949ec62.jpg.1"})
_TOKEN_LINE = re.compile(r"(?P<image>[^\t]+)#(?P<index>\d+)\t(?P<caption>.*)")
_EXAMPLES = 3  # how many offending names an error or warning quotes


class DatasetError(ValueError):
    """A dataset on disk that cannot be read as asked; the message names file (and line)."""


class DatasetWarning(UserWarning):
    """Something a reader dropped on purpose, with a count, so it is never silent."""


@dataclass(frozen=True)
class Record:
    """One image and all of its reference captions (whitespace-normalised, otherwise raw)."""

    image_id: str
    path: Path
    captions: tuple[str, ...]
    split: str  # one of SPLITS, or "" when the source has no split


# --- public readers ----------------------------------------------------------------------

def read_flickr8k(
    root: str | Path, *, splits: Sequence[str] | None = None, skip_missing: bool = False
) -> list[Record]:
    """Flickr8k as published: Flickr8k.token.txt plus the three official split lists.

    The bogus key is dropped with a counted warning. Captioned images that are in no split
    list (91 in the real data) are kept with split "" when every split is asked for (so
    `captioner features` covers all 8,091 images) and filtered out when splits are named,
    so `splits=["train", "dev", "test"]` is exactly the 6000/1000/1000 split.
    """
    root = _require_dir(root, "Flickr8k")
    tokens = _require_file(root / FLICKR8K_TOKENS,
                           f"{root}: not a Flickr8k directory (no {FLICKR8K_TOKENS})")
    split_of = _read_flickr8k_splits(root, required=True)
    image_dir = _find_image_dir(root, ("images", "Flicker8k_Dataset", "Flickr8k_Dataset"))
    captions = _read_token_file(tokens)
    return _assemble(captions, split_of, image_dir, tokens, splits, skip_missing)


def read_flickr8k_kaggle(
    root: str | Path, *, splits: Sequence[str] | None = None, skip_missing: bool = False
) -> list[Record]:
    """Kaggle's Flickr8k: captions.txt (CSV `image,caption`) and Images/.

    The official split lists are used when they sit in the same directory; without them
    every record has split "".
    """
    root = _require_dir(root, "Flickr8k (Kaggle)")
    table = _require_file(root / "captions.txt",
                          f"{root}: not a Kaggle Flickr8k directory (no captions.txt)")
    split_of = _read_flickr8k_splits(root, required=False)
    image_dir = _find_image_dir(root, ("Images", "images", "Flicker8k_Dataset",
                                       "Flickr8k_Dataset"))
    captions = _group(_read_csv_captions(table))
    return _assemble(captions, split_of, image_dir, table, splits, skip_missing)


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
    json_path = _require_file(Path(json_path), f"{json_path}: no such file")
    data = _read_json(json_path)
    entries = _json_list(data, "images", json_path)
    root = Path(image_root)
    records: dict[str, Record] = {}
    for i, entry in enumerate(entries):
        where = f"{json_path}: images[{i}]"
        name = _json_str(entry, "filename", where)
        where = f"{where} ({name})"
        if name in records:
            raise DatasetError(f"{where}: image listed twice")
        split = _parse_split(_json_str(entry, "split", where), where)
        sentences = _json_list(entry, "sentences", where)
        captions = tuple(
            _caption(_json_str(s, "raw", f"{where} sentences[{j}]"), f"{where} sentences[{j}]")
            for j, s in enumerate(sentences)
        )
        if not captions:
            raise DatasetError(f"{where}: no sentences")
        folder = entry.get("filepath") or ""
        if not isinstance(folder, str):
            raise DatasetError(f"{where}: expected a string under 'filepath'")
        records[name] = Record(name, root / folder / name, captions, split)
    return _finish(list(records.values()), json_path, splits, skip_missing)


def read_coco(
    captions_json: str | Path,
    image_dir: str | Path,
    split: str,
    *,
    skip_missing: bool = False,
) -> list[Record]:
    """One official COCO captions file (captions_train2014.json, ...), all given `split`.

    Images without any caption are dropped with a counted warning.
    """
    captions_json = _require_file(Path(captions_json), f"{captions_json}: no such file")
    split = _parse_split(split, str(captions_json))
    data = _read_json(captions_json)
    names: dict[int, str] = {}
    for i, image in enumerate(_json_list(data, "images", captions_json)):
        where = f"{captions_json}: images[{i}]"
        names[_json_int(image, "id", where)] = _json_str(image, "file_name", where)
    captions: dict[str, list[str]] = {name: [] for name in sorted(names.values())}
    for i, note in enumerate(_json_list(data, "annotations", captions_json)):
        where = f"{captions_json}: annotations[{i}]"
        image_id = _json_int(note, "image_id", where)
        if image_id not in names:
            raise DatasetError(f"{where}: image_id {image_id} is not in 'images'")
        captions[names[image_id]].append(_caption(_json_str(note, "caption", where), where))
    uncaptioned = [name for name, caps in captions.items() if not caps]
    if uncaptioned:
        _warn(f"{captions_json}: skipped {_count(uncaptioned, 'image')} without captions: "
              f"{_examples(uncaptioned)}")
    directory = Path(image_dir)
    records = [Record(name, directory / name, tuple(caps), split)
               for name, caps in captions.items() if caps]
    return _finish(records, captions_json, None, skip_missing)


def read_folder(
    root: str | Path, *, splits: Sequence[str] | None = None, skip_missing: bool = False
) -> list[Record]:
    """Your own images: root/ holding the images and captions.jsonl or captions.csv.

    captions.jsonl lines are {"image": name, "caption": str} or {"image": name, "captions":
    [...]}; captions.csv has an `image,caption` header. Names are relative to root; several
    rows for one image merge; an optional "split" field/column assigns splits.
    """
    root = _require_dir(root, "image folder")
    jsonl, table = root / "captions.jsonl", root / "captions.csv"
    if jsonl.is_file() and table.is_file():
        raise DatasetError(f"{root}: both captions.jsonl and captions.csv exist; keep one")
    if jsonl.is_file():
        rows = _read_jsonl_captions(jsonl)
        source = jsonl
    elif table.is_file():
        rows = _read_csv_captions(table, optional=("split",))
        source = table
    else:
        raise DatasetError(f"{root}: no captions.jsonl or captions.csv")
    captions: dict[str, list[str]] = {}
    split_of: dict[str, str] = {}
    for name, caption, split, line in rows:
        if split_of.setdefault(name, split) != split:
            raise DatasetError(f"{source}:{line}: {name} is in split {split!r} here but "
                               f"{split_of[name]!r} earlier")
        captions.setdefault(name, []).append(caption)
    records = [Record(name, root / name, tuple(caps), split_of[name])
               for name, caps in captions.items()]
    return _finish(records, source, splits, skip_missing)


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
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None
    return reader(Path(root), splits, skip_missing)


def _dataset_karpathy(root: Path, splits: Sequence[str] | None, skip: bool) -> list[Record]:
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
    return read_karpathy(json_path, image_root, splits=splits, skip_missing=skip)


def _dataset_coco(root: Path, splits: Sequence[str] | None, skip: bool) -> list[Record]:
    """root holds annotations/captions_{train,val}YEAR.json and the train/valYEAR folders."""
    root = _require_dir(root, "COCO")
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
    wanted = _parse_splits(splits)
    chosen = {p: split for p, split in by_split.items() if wanted is None or split in wanted}
    if not chosen:
        raise DatasetError(f"{root}: no captions file for split(s) {', '.join(wanted or ())} "
                           "(COCO has train and dev; Karpathy's test split needs 'karpathy')")
    records: list[Record] = []
    for path, split in chosen.items():
        folder = root / parts[path]
        image_dir = folder if folder.is_dir() else root / "images" / parts[path]
        records += read_coco(path, image_dir, split, skip_missing=skip)
    return sorted(records, key=lambda r: r.image_id)


def _dataset_flickr8k(root: Path, splits: Sequence[str] | None, skip: bool) -> list[Record]:
    return read_flickr8k(root, splits=splits, skip_missing=skip)


def _dataset_flickr8k_kaggle(root: Path, splits: Sequence[str] | None,
                             skip: bool) -> list[Record]:
    return read_flickr8k_kaggle(root, splits=splits, skip_missing=skip)


def _dataset_folder(root: Path, splits: Sequence[str] | None, skip: bool) -> list[Record]:
    return read_folder(root, splits=splits, skip_missing=skip)


DATASETS: dict[str, Callable[[Path, Sequence[str] | None, bool], list[Record]]] = {
    "flickr8k": _dataset_flickr8k,
    "flickr8k-kaggle": _dataset_flickr8k_kaggle,
    "karpathy": _dataset_karpathy,
    "coco": _dataset_coco,
    "folder": _dataset_folder,
}


# --- assembling and checking records -------------------------------------------------------

def _assemble(
    captions: dict[str, list[str]],
    split_of: dict[str, str] | None,
    image_dir: Path,
    source: Path,
    splits: Sequence[str] | None,
    skip_missing: bool,
) -> list[Record]:
    """Flickr8k-style captions + split lists -> records, dropping (and counting) the unlisted."""
    bogus = [name for name in captions if name in _BOGUS_KEYS]
    if bogus:
        _warn(f"{source}: skipped {_count(bogus, 'known bogus key')} with no image: "
              f"{_examples(bogus)}")
    unlisted = [name for name in captions
                if split_of is not None and name not in split_of and name not in _BOGUS_KEYS]
    if unlisted and splits is None:
        # Asked for everything (e.g. `captioner features`): keep them, with no split.
        _warn(f"{source}: kept {_count(unlisted, 'captioned image')} in no split list with no split: "
              f"{_examples(unlisted)}")
    if split_of is not None:
        uncaptioned = sorted(set(split_of) - set(captions))
        if uncaptioned:
            raise DatasetError(f"{source}: {_count(uncaptioned, 'image')} in the split lists "
                               f"have no captions: {_examples(uncaptioned)}")
    dropped = set(bogus)
    records = [Record(name, image_dir / name, tuple(caps),
                      split_of.get(name, "") if split_of is not None else "")
               for name, caps in captions.items() if name not in dropped]
    return _finish(records, source, splits, skip_missing)


def _finish(
    records: list[Record], source: Path, splits: Sequence[str] | None, skip_missing: bool
) -> list[Record]:
    """Keep the wanted splits, check the images exist, and sort by image id."""
    wanted = _parse_splits(splits)
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


def _drop_missing(records: list[Record], source: Path, skip_missing: bool) -> list[Record]:
    """Refuse (or with skip_missing drop, counted) records whose image file is absent."""
    listings: dict[Path, set[str]] = {}
    missing = [r for r in records if r.path.name not in _listing(r.path.parent, listings)]
    if not missing:
        return records
    names = [str(r.path) for r in missing]
    message = (f"{source}: {len(missing)} of {_count(records, 'captioned image')} "
               f"missing on disk: {_examples(names)}")
    if not skip_missing:
        raise DatasetError(f"{message} (skip_missing=True drops them)")
    _warn(f"{message}; skipped")
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


# --- file formats --------------------------------------------------------------------------

def _read_token_file(path: Path) -> dict[str, list[str]]:
    """Flickr8k.token.txt: `<image>#<n><TAB><caption>` per line -> {image: [captions]}."""
    captions: dict[str, list[str]] = {}
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        match = _TOKEN_LINE.fullmatch(line)
        if match is None:
            raise DatasetError(rf"{path}:{line_no}: expected '<image>#<n>\t<caption>'")
        where = f"{path}:{line_no}"
        captions.setdefault(match["image"], []).append(_caption(match["caption"], where))
    if not captions:
        raise DatasetError(f"{path}: no captions")
    return captions


def _read_flickr8k_splits(root: Path, required: bool) -> dict[str, str] | None:
    """The official split lists -> {image: split}; None when absent and not required."""
    paths = {split: root / name for split, name in FLICKR8K_SPLIT_FILES.items()}
    present = [p for p in paths.values() if p.is_file()]
    if not present and not required:
        return None
    if len(present) < len(paths):
        absent = [p.name for p in paths.values() if not p.is_file()]
        raise DatasetError(f"{root}: missing split list(s) {', '.join(absent)}")
    split_of: dict[str, str] = {}
    where: dict[str, str] = {}
    for split, path in paths.items():
        for line_no, name in _read_name_list(path):
            if name in split_of:
                raise DatasetError(f"{path}:{line_no}: {name} is also listed in {where[name]}")
            split_of[name], where[name] = split, path.name
    return split_of


def _read_name_list(path: Path) -> Iterator[tuple[int, str]]:
    """A list of file names, one a line; a name listed twice is an error."""
    first_seen: dict[str, int] = {}
    for line_no, line in _lines(path):
        name = line.strip()
        if not name:
            continue
        if name in first_seen:
            raise DatasetError(f"{path}:{line_no}: duplicate image {name} "
                               f"(first on line {first_seen[name]})")
        first_seen[name] = line_no
        yield line_no, name


def _read_csv_captions(
    path: Path, optional: tuple[str, ...] = ()
) -> list[tuple[str, str, str, int]]:
    """CSV with an `image,caption` header -> [(image, caption, split, line)]."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    header = reader.fieldnames or []
    if not {"image", "caption"} <= set(header):
        raise DatasetError(f"{path}:1: expected a header with columns 'image,caption'"
                           f"{''.join(',' + c for c in optional)}, got {','.join(header)!r}")
    rows = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row or row["caption"] is None:  # too many or too few fields
            raise DatasetError(f"{where}: expected 'image,caption' (quote captions with commas)")
        image = row["image"].strip()
        if not image:
            raise DatasetError(f"{where}: empty image name")
        split = _parse_split(row.get("split") or "", where) if "split" in optional else ""
        rows.append((image, _caption(row["caption"], where), split, reader.line_num))
    return rows


def _read_jsonl_captions(path: Path) -> list[tuple[str, str, str, int]]:
    """captions.jsonl -> [(image, caption, split, line)]; one row per caption."""
    rows = []
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON ({exc.msg})") from None
        image = _json_str(item, "image", where).strip()
        if not image:
            raise DatasetError(f"{where}: empty image name")
        split = _parse_split(item.get("split") or "", where)
        if "captions" in item:
            texts = _json_list(item, "captions", where)
            if not texts:
                raise DatasetError(f"{where}: empty 'captions' list")
        else:
            texts = [_json_str(item, "caption", where)]
        for text in texts:
            if not isinstance(text, str):
                raise DatasetError(f"{where}: captions must be strings")
            rows.append((image, _caption(text, where), split, line_no))
    return rows


def _group(rows: Iterable[tuple[str, str, str, int]]) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for image, caption, _split, _line in rows:
        captions.setdefault(image, []).append(caption)
    return captions


# --- small helpers -------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    """Whole file as strict UTF-8 (a BOM is allowed); a bad byte is reported by line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                           "re-save the file as UTF-8") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) on "\\n" only, so numbers match what an editor shows."""
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def _json_list(obj: Any, key: str, where: str | Path) -> list[Any]:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, list):
        raise DatasetError(f"{where}: expected a list under {key!r}")
    return value


def _json_str(obj: Any, key: str, where: str | Path) -> str:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        raise DatasetError(f"{where}: expected a string under {key!r}")
    return value


def _json_int(obj: Any, key: str, where: str | Path) -> int:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise DatasetError(f"{where}: expected an integer under {key!r}")
    return value


def _caption(text: str, where: str) -> str:
    """Whitespace-normalised caption; an empty one is an error, not a silent skip."""
    caption = " ".join(text.split())
    if not caption:
        raise DatasetError(f"{where}: empty caption")
    return caption


def _parse_split(value: Any, where: str) -> str:
    """A split name as a file spells it -> one of SPLITS or "" ("val" means "dev")."""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: split must be a string, got {value!r}")
    split = _SPLIT_ALIASES.get(value.strip().lower(), value.strip().lower())
    if split and split not in SPLITS:
        raise DatasetError(f"{where}: unknown split {value!r} (expected one of "
                           f"{', '.join(SPLITS)})")
    return split


def _parse_splits(splits: Sequence[str] | None) -> tuple[str, ...] | None:
    if splits is None:
        return None
    if isinstance(splits, str):
        splits = [splits]
    wanted = []
    for value in splits:
        split = _SPLIT_ALIASES.get(value.lower(), value.lower())
        if split not in (*SPLITS, ""):
            raise ValueError(f"unknown split {value!r}; choose from {', '.join(SPLITS)}")
        wanted.append(split)
    return tuple(wanted)


def _require_dir(root: str | Path, what: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such directory (expected the {what} root)")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (expected the {what} root)")
    return root


def _require_file(path: Path, message: str) -> Path:
    if not path.is_file():
        raise DatasetError(message)
    return path


def _find_image_dir(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"{root}: no image directory (looked for {', '.join(names)})")


def _count(items: Sequence[Any], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_EXAMPLES])
    return f"{shown}, ..." if len(names) > _EXAMPLES else shown


def _warn(message: str) -> None:
    warnings.warn(message, DatasetWarning, stacklevel=3)
