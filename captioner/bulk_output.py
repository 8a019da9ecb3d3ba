"""The output file of a bulk caption run: one record per image, appended as it goes, resumable.

Why it is built this way. A run over a million photos gets killed (a reboot, a pre-empted
job, Ctrl+C), so the file must be usable at any instant and a rerun must continue, not start
over. The promises:

* Whole lines only. Each batch is one `os.write` of complete lines, then `fsync`; a kill can
  leave at most one partial line at the end, which the next start cuts off.
* Resume by key. A record carries its image's path (as discovery spelled it), size and
  mtime_ns; a rerun skips the images whose record matches the file as it is now, so a changed
  file is captioned again. Its stale record is removed first (the file is rewritten without
  it through `outputs.atomic_write`), so no image ever has two records.
* One writer. An exclusive `flock` on the file refuses a second run into the same output.
* Not someone else's file. An existing file whose first line is not a record of this format
  (or a CSV header other than ours) is refused, never rewritten.

Formats, chosen by suffix: JSON lines (`.jsonl`, `.ndjson`) or CSV (`.csv`, header row,
RFC 4180 quoting; the image column escaped as in text output, `formats.escape_name`, so every
record is one physical line). Records whose file no longer exists are kept.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.errors import OutputError, UsageError, shown_path
from captioner.formats import escape_name, json_line, unescape_name
from captioner.outputs import atomic_write

__all__ = ["CSV_COLUMNS", "DoneSet", "OutputFormat", "RecordFile", "file_key", "format_for", "merge_into",
           "open_records", "part_files", "rank_file", "read_done"]

CSV_COLUMNS = ("image", "caption", "log_prob", "size", "mtime_ns", "alternatives")
_MTIME_OFFSET = 1 << 63  # mtime_ns may be negative (before 1970); keys are non-negative
_JSONL_START = '{"image": '

DoneSet = dict  # path -> file_key(size, mtime_ns): the one copy of the finished paths


def file_key(size: int, mtime_ns: int) -> int:
    """(size, mtime_ns) as one int: a done-set of a million paths stays a plain str->int dict."""
    return (size << 64) | (mtime_ns + _MTIME_OFFSET)


class OutputFormat:
    """How records become lines and lines become (path, key) again."""

    name = ""
    header = ""

    def line(self, record: dict[str, Any]) -> str:
        raise NotImplementedError

    def parse(self, line: str) -> tuple[str, int] | None:
        raise NotImplementedError

    def could_be_partial(self, tail: bytes) -> bool:
        """Whether `tail` (a file's bytes with no newline) may be the start of a first line
        this format writes: only then is a file with no complete line ours to cut."""
        raise NotImplementedError


class JsonLines(OutputFormat):
    name = "jsonl"

    def line(self, record: dict[str, Any]) -> str:
        return json_line(record)

    def parse(self, line: str) -> tuple[str, int] | None:
        try:
            row = json.loads(line)
            path, size, mtime = row["image"], row["size"], row["mtime_ns"]
        except (ValueError, TypeError, KeyError):
            return None
        if not (isinstance(path, str) and type(size) is int and type(mtime) is int and size >= 0
                and "caption" in row):
            return None
        return path, file_key(size, mtime)

    def could_be_partial(self, tail: bytes) -> bool:
        start = _JSONL_START.encode()
        return start.startswith(tail) or tail.startswith(start)


class Csv(OutputFormat):
    name = "csv"
    header = ",".join(CSV_COLUMNS)

    def line(self, record: dict[str, Any]) -> str:
        buffer = io.StringIO()
        alternatives = record.get("alternatives")
        log_prob = record.get("log_prob")
        csv.writer(buffer, lineterminator="").writerow([
            escape_name(record["image"]), record["caption"], "" if log_prob is None else log_prob,
            record["size"], record["mtime_ns"],
            "" if alternatives is None else json.dumps(alternatives, ensure_ascii=False, allow_nan=False)])
        return buffer.getvalue()

    def parse(self, line: str) -> tuple[str, int] | None:
        try:
            row = next(csv.reader([line]))
            if len(row) != len(CSV_COLUMNS):
                return None
            return unescape_name(row[0]), file_key(int(row[3]), int(row[4]))
        except (csv.Error, ValueError, StopIteration):
            return None

    def could_be_partial(self, tail: bytes) -> bool:
        return self.header.encode().startswith(tail)


def format_for(path: str | os.PathLike[str]) -> OutputFormat:
    """The format an output's suffix asks for; any other suffix is a usage error."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return JsonLines()
    if suffix == ".csv":
        return Csv()
    raise UsageError(f"{shown_path(path)}: the output must end in .jsonl (JSON lines) or .csv, got "
                     f"{suffix or 'no suffix'!r}")


@dataclass
class ScanReport:
    """What opening an existing output found and repaired (the command reports it)."""

    kept: int = 0
    stale: int = 0          # records of files changed since: removed, the image is redone
    duplicates: int = 0     # a path recorded twice (a merge killed half way): one kept
    bad_lines: int = 0      # complete lines that are not records: removed
    cut_bytes: int = 0      # a partial last line left by a kill: cut off
    merged_parts: int = 0   # leftover per-rank part files folded in
    rewritten: bool = False


@dataclass
class RecordFile:
    """An output opened for appending: `done` holds the finished images (path -> key)."""

    path: Path
    format: OutputFormat
    fd: int
    done: DoneSet
    report: ScanReport = field(default_factory=ScanReport)

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """One batch: one os.write of whole lines, then fsync (the batch is durable)."""
        if records:
            write_all(self.fd, "".join(self.format.line(r) + "\n" for r in records).encode("utf-8"))
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing releases the lock
            self.fd = -1


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a regular file may take it in parts)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def open_records(path: str | os.PathLike[str], fmt: OutputFormat, parts: Sequence[Path] = (),
                 check_stale: bool = True, lock: bool = True) -> RecordFile:
    """Open (create, repair, compact) an output for appending and read its done-set.

    `parts` are leftover per-rank part files of an interrupted multi-device run: their
    records are folded into the output (then the parts are removed). With `check_stale`,
    every record's file is stat'ed and a record of a changed file is dropped."""
    path = Path(path)
    for _attempt in range(100):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            if lock:
                _lock(fd, path)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not replaced while we waited
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    else:  # pragma: no cover - another process replacing the file a hundred times
        raise OutputError(f"{shown_path(path)}: keeps being replaced by another process")
    try:
        return _prepare(path, fmt, fd, [p for p in parts if p.exists()], check_stale, lock)
    except BaseException:
        os.close(fd)
        raise


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"{shown_path(path)}: another captioner run is writing this output") from None
    except OSError:
        pass  # a file system without locks: the run goes on unguarded


def _prepare(path: Path, fmt: OutputFormat, fd: int, parts: list[Path], check_stale: bool,
             lock: bool) -> RecordFile:
    scan = _Scan(fmt)
    size = os.fstat(fd).st_size
    cut = scan.read(path, first=True)
    for part in parts:
        scan.read(part, first=False)
    report = scan.finish(check_stale)
    report.merged_parts = len(parts)
    report.cut_bytes = 0 if cut is None else size - cut
    if report.stale or report.duplicates or report.bad_lines or parts:
        new_fd = _rewrite(path, fmt, [path, *parts], scan, lock)
        os.close(fd)
        fd = new_fd
        report.rewritten = True
        for part in parts:
            part.unlink(missing_ok=True)
    else:
        if cut is not None:
            os.ftruncate(fd, cut)
            size = cut
        if size == 0 and fmt.header:
            write_all(fd, (fmt.header + "\n").encode())
        if cut is not None or size == 0:
            os.fsync(fd)
    return RecordFile(path, fmt, fd, scan.done, report)


class _Scan:
    """One pass over an output (and part files): the done-set, and which lines to drop."""

    def __init__(self, fmt: OutputFormat) -> None:
        self.fmt = fmt
        self.done: DoneSet = {}
        self.line_no = 0
        self.last: dict[str, int] = {}  # path -> its last line, for paths seen twice only
        self.report = ScanReport()

    def read(self, path: Path, first: bool) -> int | None:
        """Read one file; returns the offset to cut a partial last line at (None: none)."""
        offset, seen_line = 0, False
        with open(path, "rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    if not seen_line and first and not self.fmt.could_be_partial(raw):
                        raise _foreign(path, self.fmt)
                    return offset
                offset += len(raw)
                header = not seen_line and bool(self.fmt.header)
                if header and raw.rstrip(b"\r\n") != self.fmt.header.encode():
                    raise _foreign(path, self.fmt)
                seen_line = True
                if header:
                    continue
                self._line(raw, path, first)
        return None

    def _line(self, raw: bytes, path: Path, first: bool) -> None:
        number = self.line_no
        self.line_no += 1
        try:
            parsed = self.fmt.parse(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError:
            parsed = None
        if parsed is None:
            if number == 0 and first:
                raise _foreign(path, self.fmt)
            self.report.bad_lines += 1  # never copied by a rewrite
            return
        image, key = parsed
        if image in self.done:
            self.report.duplicates += 1
            self.last[image] = number  # only the last record of a path survives
        self.done[image] = key

    def finish(self, check_stale: bool) -> ScanReport:
        if check_stale:
            for image in [p for p, key in self.done.items() if _current_key(p) not in (key, None)]:
                del self.done[image]
                self.report.stale += 1
        self.report.kept = len(self.done)
        return self.report

    def keeps(self, number: int, image: str, key: int) -> bool:
        """Whether line `number` (a record of `image` with `key`) survives a rewrite."""
        if self.done.get(image) != key:
            return False
        last = self.last.get(image)
        return last is None or last == number


def _current_key(path: str) -> int | None:
    try:
        info = os.stat(path)
    except OSError:
        return None  # gone (or unreadable): the record is kept, nothing will redo it
    return file_key(info.st_size, info.st_mtime_ns)


def _rewrite(path: Path, fmt: OutputFormat, sources: list[Path], scan: _Scan, lock: bool) -> int:
    """Write the surviving lines to a new file renamed over `path`; returns its locked,
    appending descriptor (taken before the rename, so no other run slips in)."""
    holder: list[int] = []

    def write(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND)
        holder.append(fd)
        if lock:
            _lock(fd, Path(tmp))
        chunk: list[bytes] = [(fmt.header + "\n").encode()] if fmt.header else []
        for number, raw, image, key in _records(sources, fmt):
            if scan.keeps(number, image, key):
                chunk.append(raw)
                if len(chunk) >= 4096:
                    write_all(fd, b"".join(chunk))
                    chunk.clear()
        write_all(fd, b"".join(chunk))

    try:
        atomic_write(path, write)
    except BaseException:
        for fd in holder:
            os.close(fd)
        raise
    return holder[0]


def _records(sources: Iterable[Path], fmt: OutputFormat) -> Iterator[tuple[int, bytes, str, int]]:
    """(line number, raw line, path, key) of every complete record line, numbered as _Scan did."""
    number = 0
    for source in sources:
        with open(source, "rb") as fh:
            seen_line = False
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break
                if not seen_line and fmt.header:
                    seen_line = True
                    continue
                seen_line = True
                try:
                    parsed = fmt.parse(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError:
                    parsed = None
                if parsed is not None:
                    yield number, raw, parsed[0], parsed[1]
                number += 1


def _foreign(path: Path, fmt: OutputFormat) -> OutputError:
    what = f"a captioner CSV output (header {fmt.header})" if fmt.header else "a captioner JSON-lines output"
    return OutputError(f"{shown_path(path)}: exists and is not {what}; it is never overwritten: "
                       "choose another output file")


def read_done(path: str | os.PathLike[str], fmt: OutputFormat, keep: Callable[[str], bool]) -> DoneSet:
    """A read-only done-set of the records `keep` selects (a rank's share of a compacted output)."""
    scan = _Scan(fmt)
    try:
        scan.read(Path(path), first=True)
    except FileNotFoundError:
        return {}
    return {image: key for image, key in scan.done.items() if keep(image)}


def rank_file(path: Path, rank: int) -> Path:
    """Where rank `rank` of a multi-device run writes: OUTPUT.rank<R>.part, beside OUTPUT."""
    return path.with_name(f"{path.name}.rank{rank}.part")


def part_files(path: Path) -> list[Path]:
    """Leftover rank files of `path` from an interrupted multi-device run (any world size)."""
    prefix = f"{path.name}.rank"
    directory = path.parent if str(path.parent) else Path(".")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(directory / name for name in names
                  if name.startswith(prefix) and name.endswith(".part") and name[len(prefix):-5].isdigit())


def merge_into(records: RecordFile, parts: Sequence[Path]) -> RecordFile:
    """Fold per-rank part files into the open (locked) output `records`, atomically; the parts
    are removed. Returns the output opened again (the old descriptor is closed)."""
    fd, records.fd = records.fd, -1
    try:
        return _prepare(records.path, records.format, fd, [p for p in parts if p.exists()],
                        check_stale=False, lock=True)
    except BaseException:
        os.close(fd)
        raise
