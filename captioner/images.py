"""Safe image loading: each image costs one RGB image or one clear error, in bounded time and
memory, whatever the file holds.

Every image the package touches (training, feature caching, `captioner caption`, the web
demo) goes through `load_image`, so one bad file costs one line ("PATH: reason"), never a
traceback mid-epoch, a hung process or an exhausted machine. The rules:

* Only regular files are opened, never blocking (a FIFO named x.jpg is refused by type).
* Only `SUPPORTED_FORMATS` are decoded (not EPS, which runs Ghostscript); a format Pillow
  knows but we do not decode is named as such.
* Before any pixel is decoded: file size (`max_bytes`), pixel count (`max_pixels`) and the
  peak memory of decoding plus conversion to RGB (`max_decode_bytes`, estimated from the
  header by format, mode and bit depth). Every read checks a deadline (`max_seconds`), and a
  header that takes absurdly many reads (junk scanned byte by byte) is refused early.
* Decoding is strict: a truncated file or a bad PNG checksum is an error, never a silently
  grey-padded image. EXIF orientation is applied, transparency composited onto white, and
  16/32-bit greyscale rescaled to 8 bits rather than clipped.
"""
from __future__ import annotations

import fcntl
import os
import stat
import struct
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from PIL import Image, ImageFile, ImageOps

from captioner.errors import ImageLoadError, one_line
from captioner.image_headers import (
    STRIP_PIXELS,
    SUPPORTED_FORMATS,
    Header,
    format_of,
    read_header,
    unidentified_reason,
)

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_MAX_DECODE_BYTES", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_SECONDS",
    "IMAGE_EXTENSIONS", "SUPPORTED_FORMATS", "ImageLoadError", "estimate_decode_bytes",
    "file_type_reason", "load_image", "to_rgb",
]

# Pillow's own default limit (about 89.5 megapixels, a 9459 x 9459 image).
DEFAULT_MAX_PIXELS = 89_478_485
# Far above any JPEG or PNG of DEFAULT_MAX_PIXELS a camera or editor writes.
DEFAULT_MAX_BYTES = 256 * 2**20
# Peak memory of one load: admits every supported format at DEFAULT_MAX_PIXELS but WebP,
# whose decoder keeps extra copies (up to about 88 megapixels).
DEFAULT_MAX_DECODE_BYTES = 3 * 2**29  # 1.5 GiB
# Reading and decoding a legal 89-megapixel image takes 1-2 s; junk must not take minutes.
DEFAULT_MAX_SECONDS = 10.0

# Extensions picked up when a directory or glob is expanded (compared lower-cased). A file
# named explicitly is tried whatever its extension.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm", ".pnm", ".avif", ".ico"}
)

# A JPEG header is a few dozen segments; scanning junk byte by byte takes one read per byte
# (20 MB of it ran for minutes). No real header of a supported format needs this many reads.
_MAX_HEADER_READS = 65_536
# What may precede the pixel data (EXIF, ICC, XMP, PNG text, TIFF tags); it is kept in memory.
_MAX_HEADER_BYTES = 64 * 2**20
_STRIP_PIXELS = STRIP_PIXELS  # conversion to RGB works on strips this large

# Exceptions Pillow's decoders raise on bad content. Anything else is a bug, not a bad file.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, struct.error,
    EOFError, OverflowError, ZeroDivisionError, MemoryError,
)
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link"))


def file_type_reason(mode: int) -> str | None:
    """None for a regular file; otherwise why it is refused, naming its kind ("FIFO")."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    return f"not a regular file ({kind})"


def load_image(
    path: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> Image.Image:
    """Decode `path` fully into an upright 8-bit RGB image, or raise `ImageLoadError`.

    `max_pixels` refuses images whose header declares more pixels, `max_bytes` larger files
    and `max_decode_bytes` images whose estimated peak memory (see `estimate_decode_bytes`) is
    larger, all before decoding. `max_seconds` bounds reading and decoding (checked at every
    read; the conversion to RGB after it is bounded by the pixel count). `draft_size` (width,
    height) lets a JPEG decode at 1/2, 1/4 or 1/8 scale while staying at least that large,
    which makes big photos several times cheaper when the caller will downscale anyway; the
    result is then not the file's full size.
    """
    with _guarded(path, max_bytes, max_seconds) as fp:
        header = read_header(fp, path, max_pixels, draft_size)
        if header.need > max_decode_bytes:
            raise ImageLoadError(
                path, f"image needs about {header.need / 2**20:,.0f} MiB to decode, over the "
                      f"limit of {max_decode_bytes / 2**20:,.0f} MiB")
        return _decode(fp, header)


def estimate_decode_bytes(
    path: str | os.PathLike[str],
    draft_size: tuple[int, int] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> int:
    """Upper bound of the peak memory `load_image` uses for `path`, from its header alone.

    Lets a server admit images against a shared memory budget before decoding any. Raises
    `ImageLoadError` for files `load_image` would refuse before decoding (not regular, too
    big, not a supported image, over Pillow's own pixel limit).
    """
    with _guarded(path, max_bytes, DEFAULT_MAX_SECONDS) as fp:
        return read_header(fp, path, None, draft_size).need


# --- opening -----------------------------------------------------------------------------


class _Cutoff(Exception):
    """Stops a decode from inside a read (args[0]: the reason). Not one of the error types
    Pillow's plugins catch, so none swallows it."""


class _GuardedFile:
    """The file as Pillow sees it. Each read or seek first checks the deadline; reads never
    ask for more than is left of the file (a header's length field cannot make Pillow
    allocate gigabytes); while the header is parsed, the number of reads and bytes is capped
    (None once it is parsed, or for formats whose opener reads the whole file)."""

    def __init__(self, fp: IO[bytes], size: int, seconds: float) -> None:
        self._fp, self.size, self._seconds = fp, size, seconds
        self._deadline = time.monotonic() + seconds
        self._pos = 0
        self.head = fp.read(16)
        fp.seek(0)
        self.header_reads: int | None = _MAX_HEADER_READS
        self.header_limit = _MAX_HEADER_BYTES
        self.header_bytes: int | None = self.header_limit

    def _check(self) -> None:
        if time.monotonic() > self._deadline:
            raise _Cutoff(f"image took longer than {self._seconds:g} s to decode (gave up at "
                          f"byte {self._pos:,} of {self.size:,})")

    def read(self, size: int | None = -1) -> bytes:
        self._check()
        if self.header_reads is not None:
            self.header_reads -= 1
            if self.header_reads < 0:
                raise _Cutoff(f"corrupt {format_of(self.head) or 'image'} file (header parsing "
                              f"gave up at byte {self._pos:,} after {_MAX_HEADER_READS:,} reads)")
        left = max(self.size - self._pos, 0)
        size = left if size is None or size < 0 or size > left else size
        if self.header_bytes is not None:
            self.header_bytes -= size
            if self.header_bytes < 0:
                raise _Cutoff(f"{format_of(self.head) or 'image'} header larger than "
                              f"{self.header_limit / 2**20:g} MiB (the limit for the metadata "
                              f"before the pixel data)")
        data = self._fp.read(size)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check()
        self._pos = self._fp.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos


@contextmanager
def _guarded(path: str | os.PathLike[str], max_bytes: int,
             seconds: float) -> Iterator[_GuardedFile]:
    """Open `path` safely; every failure inside the block becomes an `ImageLoadError`."""
    with _open_regular(path, max_bytes) as (raw, size):
        fp = _GuardedFile(raw, size, seconds)
        try:
            with warnings.catch_warnings():
                # Our own checks decide; Pillow's warnings would only be printed noise.
                warnings.simplefilter("ignore")
                yield fp
        except ImageLoadError:
            raise
        except _Cutoff as exc:
            raise ImageLoadError(path, exc.args[0]) from None
        except Image.DecompressionBombError as exc:  # Pillow's own limit, hit inside open()
            raise ImageLoadError(path, f"image too large ({exc})") from None
        except Image.UnidentifiedImageError:
            raise ImageLoadError(path, unidentified_reason(fp.head)) from None
        except _DECODE_ERRORS as exc:
            raise ImageLoadError(path, _decode_reason(exc)) from None


@contextmanager
def _open_regular(path: str | os.PathLike[str], max_bytes: int) -> Iterator[tuple[IO[bytes], int]]:
    """Open a regular file for reading without ever blocking (a FIFO with no writer blocks a
    plain open for ever) and without opening devices at all; refuse empty or oversized files."""
    try:
        reason = file_type_reason(os.stat(path).st_mode)
        if reason:
            raise ImageLoadError(path, reason)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot open ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)  # what was opened: the path may have been swapped since the stat
        reason = file_type_reason(info.st_mode)
        if reason:
            raise ImageLoadError(path, reason)
        if info.st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
        if info.st_size > max_bytes:
            raise ImageLoadError(path, f"file too large: {info.st_size:,} bytes exceeds the limit "
                                       f"of {max_bytes:,}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        fp = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fp:
        yield fp, info.st_size


# --- decoding ----------------------------------------------------------------------------


def _decode(fp: _GuardedFile, header: Header) -> Image.Image:
    """Decode what `read_header` opened (and drafted); the caller has checked its cost."""
    im, header.im = header.im, None  # held here alone, so it is freed before converting
    if im is None:  # ICO or WebP, checked from its own header: now let Pillow open it
        fp.seek(0)
        im = Image.open(fp, formats=[format_of(fp.head) or ""])
        fp.header_reads = fp.header_bytes = None
    elif im.format == "PNG":
        # Pillow's normal PNG decode skips the pixel chunks' CRCs; verify() checks them all
        # (raising SyntaxError) but leaves the image unusable, so open it again.
        im.verify()
        fp.seek(0)
        im = Image.open(fp, formats=["PNG"])
    with _strict_truncation():
        im.load()
    ImageOps.exif_transpose(im, in_place=True)  # no copy unless it does rotate
    pixels = im._new(im.im)  # a plain Image (as copy() gives) sharing the decoded pixels
    del im  # the plugin object, with any decoder buffers it keeps (WebP, AVIF)
    return to_rgb(pixels)


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make a truncated file an error even if some other code enabled lenient loading."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB the way an image viewer would show it.

    Large images are converted in horizontal strips: every step is per pixel, so the result
    is the same, while the temporaries (up to five copies for a transparent image) stay a
    few megabytes instead of multiples of the image.
    """
    if im.mode == "RGB" and not im.has_transparency_data:
        return im
    rows = max(1, _STRIP_PIXELS // max(im.width, 1))
    if im.height <= rows:
        return _convert(im)
    strips = [(0, top, im.width, min(im.height, top + rows)) for top in range(0, im.height, rows)]
    extrema = None
    if im.mode in _HIGH_DEPTH:  # the rescaling range is the whole image's
        ranges = [im.crop(box).convert("F").getextrema() for box in strips]
        extrema = (min(low for low, _ in ranges), max(high for _, high in ranges))
    out = None
    for box in strips:
        part = _convert(im.crop(box), extrema)
        if out is None:
            out = Image.new("RGB", im.size)
            out.info = dict(part.info)
        out.paste(part, box[:2])
    return out


def _convert(im: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    if im.mode in _HIGH_DEPTH:
        im = _high_depth_to_l(im, extrema)
    if im.has_transparency_data:  # alpha channel, or a tRNS colour in P, L or RGB images
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _high_depth_to_l(im: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    """Rescale 16/32-bit greyscale to 8 bits; Pillow's own convert("L") clips at 255.

    16-bit data maps 0..65535 onto 0..255. 32-bit integer or float data has no fixed range,
    so its own minimum..maximum is stretched over 0..255 unless it already fits 16 bits.
    """
    wide = im.convert("F")  # 32-bit float holds every value of every such mode exactly
    low, high = extrema or wide.getextrema()
    if im.mode.startswith("I;16") or (im.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    scale = 255.0 / (high - low) if high > low else 0.0
    return wide.point(lambda v: (v - low) * scale + 0.5).convert("L")  # +0.5: round, not floor


def _decode_reason(exc: BaseException) -> str:
    """A decoder exception, worded as a short reason a user can act on."""
    detail = one_line(str(exc)) or type(exc).__name__
    if "truncated" in detail.lower() or isinstance(exc, EOFError):
        return f"truncated image file ({detail})"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode the image"
    return f"corrupt image data ({detail})"
