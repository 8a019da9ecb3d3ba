"""Admission control: what an upload will cost in memory, and whether it may start now.

Why: an image's cost is set by its header, not its file size; a 3 MB PNG may declare 89
megapixels. The cost is computed from the header before any pixel is decoded and held
against one budget shared by all requests (a weighted semaphore over bytes), so the memory
of all decodes at once stays below the budget whatever arrives.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from captioner.images import SUPPORTED_FORMATS, estimate_decode_bytes

MIB = 1024 * 1024
# After load_image, `Captioner.preprocess` holds the RGB image (Pillow stores 4 bytes a pixel)
# while torchvision copies it out through `tobytes()` and `np.array` (3 + 3): 10 bytes a
# pixel, measured at 843 MiB for 9400 x 9400 (docs/reliability.md). The resize output is small.
PREPROCESS_BYTES_PER_PIXEL = 10
PREPROCESS_MARGIN = 16 * MIB


class BudgetTimeout(Exception):
    """No room in the memory budget within the wait allowed."""


def decoded_pixels(path: str, draft_size: tuple[int, int] | None) -> int | None:
    """Pixels of the image `load_image(path, draft_size=...)` returns, from its header alone;
    None when only decoding would tell (ICO and WebP, where Pillow decodes inside open()).

    Called after `estimate_decode_bytes` accepted the file, so the header is known to parse
    within load_image's limits."""
    with open(path, "rb") as fp:
        head = fp.read(16)
    if head.startswith(b"\x00\x00\x01\x00") or (head.startswith(b"RIFF") and head[8:12] == b"WEBP"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path, formats=SUPPORTED_FORMATS) as im:
                if draft_size is not None and im.format in ("JPEG", "MPO"):
                    im.draft("RGB", draft_size)
                return im.width * im.height
    except Exception:  # noqa: BLE001 - unreadable here means "unknown": the caller bounds it
        return None


def upload_cost(path: str, draft_size: tuple[int, int] | None, max_bytes: int) -> int:
    """Peak bytes of decoding and preprocessing the upload at `path`, plus the file itself.

    Raises `ImageLoadError` for a file load_image would refuse before decoding."""
    decode = estimate_decode_bytes(path, draft_size, max_bytes=max_bytes)
    pixels = decoded_pixels(path, draft_size)
    if pixels is None:
        pixels = decode // 4  # every decode holds the RGB image, 4 bytes a pixel
    return max(decode, PREPROCESS_BYTES_PER_PIXEL * pixels + PREPROCESS_MARGIN) + os.path.getsize(path)


class MemoryBudget:
    """A weighted semaphore over bytes: the costs of admitted images never sum above `total`.

    Large images (cost > `small`) wait in arrival order and together use at most
    `total - reserve`; small ones are admitted as soon as they fit, but while a large image
    waits they share only the `reserve`, so neither kind starves the other: a queue of huge
    images delays an ordinary photo by no more than its own work, and a stream of photos
    cannot keep a large image out once the large ones ahead of it are done."""

    def __init__(self, total: int, reserve: int, small: int) -> None:
        self.total, self.reserve, self.small = total, reserve, small
        self.large_used = 0
        self.small_used = 0
        self.peak = 0
        self.waiting = 0
        self._queue: collections.deque[object] = collections.deque()  # large images, first come first served
        self._cond = threading.Condition()

    @property
    def largest(self) -> int:
        return self.total - self.reserve

    @property
    def used(self) -> int:
        return self.large_used + self.small_used

    def _fits(self, cost: int, ticket: object | None) -> bool:
        if self.used + cost > self.total:
            return False
        if ticket is None:
            return not self._queue or self.small_used + cost <= self.reserve
        return self._queue[0] is ticket and self.large_used + cost <= self.largest

    @contextmanager
    def hold(self, cost: int, timeout: float) -> Iterator[None]:
        """Hold `cost` bytes for the block, waiting at most `timeout` s (BudgetTimeout)."""
        if cost > self.largest:
            raise ValueError(f"cost {cost} exceeds the largest admissible {self.largest}")
        large = cost > self.small
        ticket = object() if large else None
        deadline = time.monotonic() + timeout
        with self._cond:
            if ticket is not None:
                self._queue.append(ticket)
            self.waiting += 1
            try:
                while not self._fits(cost, ticket):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BudgetTimeout
                    self._cond.wait(left)
            finally:
                self.waiting -= 1
                if ticket is not None:
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # the next large image may now be first
            if large:
                self.large_used += cost
            else:
                self.small_used += cost
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                if large:
                    self.large_used -= cost
                else:
                    self.small_used -= cost
                last_large = large and not self.large_used
                self._cond.notify_all()
            if last_large:
                return_freed_memory()

    def state(self) -> dict[str, int]:
        with self._cond:
            return {"decode_bytes_in_use": self.used, "decode_bytes_peak": self.peak,
                    "uploads_waiting_for_memory": self.waiting}


# glibc malloc.h: blocks at least this large get their own mmap, unmapped again on free.
M_MMAP_THRESHOLD = -3
# Above a batch-of-one encoder's activations (under 2 MB at 224 x 224), below Pillow's 16 MiB
# image blocks and every image-sized buffer.
MMAP_THRESHOLD = 4 * MIB


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # glibc only: musl's differ


@functools.cache
def give_back_large_blocks() -> bool:
    """Once per process: serve every block of 4 MiB or more from its own mmap, so freeing an
    image's buffers returns them to the kernel. glibc otherwise raises its mmap threshold
    after the first large free (up to 32 MiB), the next image's 16 MiB blocks come from
    per-thread heaps, and a burst of large images ratchets the resident size up by
    hundreds of MB (measured in docs/reliability.md). The opposite choice from
    `captioner.allocator.keep_freed_memory`, which suits batch captioning, not a server.
    True when applied (glibc on Linux)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def return_freed_memory() -> None:
    """Hand the heaps' free pages back to the kernel after the last large image in flight,
    for what smaller allocations around the decode left behind."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
