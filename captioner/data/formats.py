"""The text formats datasets come in: strict UTF-8 read by line, JSON, and the CSV and JSON
Lines caption tables, with `file:line` (or the JSON position) in every error."""
from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.data.records import image_name, split_in_file
from captioner.errors import DatasetError

__all__ = ["CaptionRow", "caption", "json_int", "json_list", "json_str", "lines", "read_csv_captions",
           "read_json", "read_jsonl_captions", "read_text", "require_dir", "require_file"]


@dataclass(frozen=True)
class CaptionRow:
    """One caption of a caption table. `listed`: it came from a JSON Lines "captions" list,
    which holds all of that image's captions."""

    image: str  # normalised (records.image_name)
    caption: str
    split: str
    line: int
    listed: bool = False


def read_text(path: Path) -> str:
    """Whole file as strict UTF-8 (a BOM is allowed); a bad byte is reported by line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                           "re-save the file as UTF-8") from None


def lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) on "\\n" only, so numbers match what an editor shows."""
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        yield number, line.removesuffix("\r")


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise DatasetError(f"{path}: invalid JSON (nested too deeply)") from None


def json_list(obj: Any, key: str, where: str | Path) -> list[Any]:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, list):
        raise DatasetError(f"{where}: expected a list under {key!r}")
    return value


def json_str(obj: Any, key: str, where: str | Path) -> str:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        raise DatasetError(f"{where}: expected a string under {key!r}")
    return value


def json_int(obj: Any, key: str, where: str | Path) -> int:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise DatasetError(f"{where}: expected an integer under {key!r}")
    return value


def caption(text: str, where: str) -> str:
    """Whitespace-normalised caption; an empty one is an error, not a silent skip."""
    cleaned = " ".join(text.split())
    if not cleaned:
        raise DatasetError(f"{where}: empty caption")
    return cleaned


def require_dir(root: str | Path, what: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such directory (expected the {what} root)")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (expected the {what} root)")
    return root


def require_file(path: Path, message: str) -> Path:
    if not path.is_file():
        raise DatasetError(message)
    return path


def read_csv_captions(path: Path, folder: Path, with_split: bool = False) -> list[CaptionRow]:
    """CSV with an `image,caption` header (and a `split` column when `with_split`), one
    caption a row; image names are relative to `folder`."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    header = reader.fieldnames or []
    if not {"image", "caption"} <= set(header):
        raise DatasetError(f"{path}:1: expected a header with columns 'image,caption'"
                           f"{',split' if with_split else ''}, got {','.join(header)!r}")
    rows = []
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or row["caption"] is None:  # too many or too few fields
                raise DatasetError(f"{where}: expected 'image,caption' (quote captions with commas)")
            split = split_in_file(row.get("split") or "", where) if with_split else ""
            rows.append(CaptionRow(image_name(row["image"].strip(), where, folder),
                                   caption(row["caption"], where), split, reader.line_num))
    except csv.Error as exc:
        raise DatasetError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return rows


def read_jsonl_captions(path: Path, folder: Path) -> list[CaptionRow]:
    """captions.jsonl: {"image", "caption" | "captions", "split"?} a line, one row per
    caption; image names are relative to `folder`."""
    rows = []
    for line_no, line in lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DatasetError(f"{where}: invalid JSON (nested too deeply)") from None
        image = image_name(json_str(item, "image", where).strip(), where, folder)
        split = split_in_file(item.get("split") or "", where)
        listed = "captions" in item
        if listed:
            texts = json_list(item, "captions", where)
            if not texts:
                raise DatasetError(f"{where}: empty 'captions' list")
        else:
            texts = [json_str(item, "caption", where)]
        for text in texts:
            if not isinstance(text, str):
                raise DatasetError(f"{where}: captions must be strings")
            rows.append(CaptionRow(image, caption(text, where), split, line_no, listed))
    return rows
