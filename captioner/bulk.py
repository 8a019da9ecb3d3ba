"""Captioning a large collection into a resumable output file (`bulk_output.RecordFile`).

The pipeline, built so that a million-file tree starts captioning within seconds and never
holds all its paths: discovery streams (`discovery.iter_images`), each image is stat'ed once
(its size and mtime_ns make the resume key, taken before it is read, so a file changed while
being captioned is redone next time), images already in the output are skipped (and dropped
from the done-set as they pass, so it only shrinks), and the rest go to
`Captioner.iter_captions`, which decodes one batch ahead on a thread pool while the encoder
runs. Records are appended a batch at a time.

Work can be split without coordination: `Shard` i/n (and, inside a multi-device run, the
rank) picks an image by a stable hash of its path, so every process agrees on who owns which
image without talking, and the same arguments always pick the same images.

The library reports through an `Events` object and never prints; the command draws the
progress bar and the error lines.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from captioner.bulk_output import DoneSet, RecordFile, file_key, write_all
from captioner.discovery import Found, iter_images
from captioner.errors import UsageError
from captioner.formats import json_line

if TYPE_CHECKING:
    from captioner.api import Captioner, CaptionResult
    from captioner.decoding import DecodingConfig

__all__ = ["BulkSummary", "ErrorsFile", "Events", "Item", "Selector", "Shard", "caption_items", "count_images",
           "pending", "record_of", "run_bulk", "stable_hash"]

SKIP_REPORT_EVERY = 1024  # a long run of already-done images still moves the progress bar


# ---- who does which image ----------------------------------------------------------------

def stable_hash(path: str) -> int:
    """The same 64-bit number for a path on every machine and run (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(os.fsencode(path), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based: 0/4 .. 3/4), as Slurm array and Kubernetes indexed
    job indices are."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/n' with 0 <= i < n; anything else raises UsageError naming the rule."""
        index, slash, count = text.strip().partition("/")
        if not (slash and index.isascii() and index.isdigit() and count.isascii() and count.isdigit()
                and len(index) < 10 and len(count) < 10):
            raise UsageError(f"--shard must be I/N with integers 0 <= I < N (e.g. 0/4), got {text!r}")
        shard = cls(int(index), int(count))
        if not 0 <= shard.index < shard.count:
            raise UsageError(f"--shard must be I/N with integers 0 <= I < N (e.g. 0/4), got {text!r}")
        return shard


class Selector:
    """Picks a path when its hash lands on every (index, count) given: a shard, then a rank
    inside it (the hash's quotient by the first count decides the second, so the two splits
    are independent)."""

    def __init__(self, parts: Sequence[tuple[int, int]]) -> None:
        self.parts = [(i, n) for i, n in parts if n > 1]

    def __bool__(self) -> bool:
        return bool(self.parts)

    def __call__(self, path: str) -> bool:
        h = stable_hash(path)
        for index, count in self.parts:
            if h % count != index:
                return False
            h //= count
        return True


# ---- what a run reports ------------------------------------------------------------------

class Events:
    """What a run tells its caller as it goes; every method may be overridden (the command
    draws a progress bar and prints errors). Nothing here prints."""

    def problem(self, path: str, reason: str) -> None:
        """A path that could not be captioned (unreadable, not an image, vanished)."""

    def started(self, rank: int, world_size: int, select: Callable[[str], bool] | None) -> None:
        """A multi-device run's process knows its rank (the progress bar is rank 0's)."""

    def skipped(self, count: int) -> None:
        """`count` more images were already in the output."""

    def written(self, captioned: int, failed: int) -> None:
        """A batch is durable in the output: `captioned` records, `failed` images not."""


class ErrorsFile(Events):
    """`--errors FILE`: each problem also as one JSON line {"image", "error"} in FILE (this
    run's problems: the file is started afresh, since a rerun tries every failed image again).
    Every event is passed on to `inner`."""

    def __init__(self, path: str | os.PathLike[str], inner: Events) -> None:
        self.inner = inner
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)

    def problem(self, path: str, reason: str) -> None:
        write_all(self.fd, (json_line({"image": path, "error": reason}) + "\n").encode("utf-8"))
        self.inner.problem(path, reason)

    def started(self, rank: int, world_size: int, select: Callable[[str], bool] | None) -> None:
        self.inner.started(rank, world_size, select)

    def skipped(self, count: int) -> None:
        self.inner.skipped(count)

    def written(self, captioned: int, failed: int) -> None:
        self.inner.written(captioned, failed)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class BulkSummary:
    captioned: int = 0
    failed: int = 0     # images found that could not be captioned (problems included)
    skipped: int = 0
    superseded: int = 0  # images changed during the run after the output was opened
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0


# ---- the pipeline ------------------------------------------------------------------------

@dataclass(slots=True)
class Item:
    """An image to caption and the file state its record will carry."""

    path: str
    size: int
    mtime_ns: int


def pending(found: Iterable[Found], done: DoneSet, select: Callable[[str], bool] | None, events: Events,
            summary: BulkSummary) -> Iterator[Item]:
    """The images still to caption, in discovery order: problems reported, other shards' and
    finished images left out. A finished path leaves `done` as it passes."""
    skipped = 0
    for one in found:
        if not one.ok:
            if select is None or select(one.path):
                summary.failed += 1
                events.problem(one.path, one.problem or "")
            continue
        path = one.path
        if select is not None and not select(path):
            continue
        try:
            info = os.stat(path)
        except OSError as exc:
            summary.failed += 1
            events.problem(path, f"cannot read ({exc.strerror or exc})")
            continue
        before = done.pop(path, None)
        if before == file_key(info.st_size, info.st_mtime_ns):
            skipped += 1
            if skipped >= SKIP_REPORT_EVERY:
                summary.skipped += skipped
                events.skipped(skipped)
                skipped = 0
            continue
        if before is not None:
            summary.superseded += 1  # changed after the output was opened: its old record goes at the end
        if skipped:
            summary.skipped += skipped
            events.skipped(skipped)
            skipped = 0
        yield Item(path, info.st_size, info.st_mtime_ns)
    if skipped:
        summary.skipped += skipped
        events.skipped(skipped)


def record_of(result: CaptionResult, item: Item, n_best: int) -> dict[str, Any]:
    """One output record: JSON-safe (`to_json` turns NaN into null), alternatives only when
    more than one caption per image was asked for."""
    row = result.to_json()
    row["image"] = item.path
    if n_best <= 1:
        row.pop("alternatives", None)
    row["size"], row["mtime_ns"] = item.size, item.mtime_ns
    return row


def caption_items(captioner: Captioner, config: DecodingConfig, items: Iterable[Item], *, batch_size: int,
                  workers: int | None, write: Callable[[list[dict[str, Any]]], None], events: Events,
                  summary: BulkSummary) -> None:
    """Caption `items` batch by batch; after each batch, its records go to `write` (durable
    once it returns) and failures to `events.problem`."""
    queue: deque[Item] = deque()

    def paths() -> Iterator[str]:
        for item in items:
            queue.append(item)
            yield item.path

    records: list[dict[str, Any]] = []
    failed = 0
    results = captioner.iter_captions(paths(), config, batch_size=batch_size, workers=workers)
    for consumed, result in enumerate(results, 1):
        item = queue.popleft()  # results come in input order, one per input
        if result.ok:
            records.append(record_of(result, item, config.n_best))
        else:
            failed += 1
            events.problem(item.path, result.error or "cannot be captioned")
        if consumed % batch_size == 0:  # the end of one of iter_captions' batches
            _flush(records, failed, write, events, summary)
            records, failed = [], 0
    _flush(records, failed, write, events, summary)


def _flush(records: list[dict[str, Any]], failed: int, write: Callable[[list[dict[str, Any]]], None],
           events: Events, summary: BulkSummary) -> None:
    if records:
        write(records)
    summary.captioned += len(records)
    summary.failed += failed
    if records or failed:
        events.written(len(records), failed)


def run_bulk(captioner: Captioner, config: DecodingConfig, paths: Sequence[str], records: RecordFile, *,
             batch_size: int, workers: int | None = None, select: Callable[[str], bool] | None = None,
             events: Events | None = None) -> BulkSummary:
    """Caption every image under `paths` not yet in `records` (owned by `select`, if given)
    into it. A bad image is reported and skipped; it never stops the run."""
    events = events or Events()
    summary = BulkSummary()
    start = time.perf_counter()
    items = pending(iter_images(paths), records.done, select, events, summary)
    caption_items(captioner, config, items, batch_size=batch_size, workers=workers, write=records.append,
                  events=events, summary=summary)
    summary.seconds = time.perf_counter() - start
    return summary


# ---- counting, for the progress bar's total ------------------------------------------------

def count_images(paths: Iterable[str], stop: threading.Event | None = None,
                 select: Callable[[str], bool] | None = None) -> int | None:
    """How many images `iter_images(paths)` gives (with `select`, this shard's or rank's
    share): the same walk, counted as it streams, nothing kept per file. Run in a background
    thread for the progress bar's total; returns None once `stop` is set."""
    total = 0
    for found in iter_images(paths):
        if stop is not None and stop.is_set():
            return None
        if found.ok and (select is None or select(found.path)):
            total += 1
    return total
