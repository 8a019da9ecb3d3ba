"""What an image file's header declares, read before any pixel is decoded: which supported
format it is, whether its structure can be decoded safely, and what decoding it will cost.

`captioner.images.load_image` refuses files on this answer before decoding, and a server can
admit uploads against a memory budget with it (`estimate_decode_bytes`). ICO and WebP are
sized from their own headers, because Pillow decodes an icon, and allocates a WebP canvas,
inside open(); TIFF directories are checked first, because Pillow makes every value of a tag
a Python int while opening. The memory estimate was calibrated by measuring the peak
resident memory of every format and mode, and is an upper bound of it.
"""
from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from typing import Protocol

from PIL import Image, features

from captioner.errors import ImageLoadError

__all__ = ["STRIP_PIXELS", "SUPPORTED_FORMATS", "Header", "Reader", "format_of", "read_header",
           "unidentified_reason", "usable_formats"]

# The formats decoded, as Pillow names them. PPM covers PBM, PGM, PPM and PNM; JPEG includes
# camera MPO files. AVIF is used where Pillow was built with it.
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "ICO", "AVIF")
# Conversion to RGB works on strips of this many pixels, so its temporaries stay small.
STRIP_PIXELS = 1 << 20
# Pillow makes each value of a numeric TIFF tag a Python int while opening, and loops
# over strips or tiles in Python (20 us each): 5 million strips cost minutes and gigabytes.
# Real files use a few thousand at most; a 16-bit colour map holds 196,608 values.
_MAX_TIFF_VALUES, _MAX_TIFF_PARTS = 1 << 18, 1 << 16
_TIFF_PARTS = (273, 279, 324, 325)  # strip and tile offsets and byte counts
# An icon file holds a handful of sizes; Pillow decodes one while opening, so all are checked.
_MAX_ICO_FRAMES = 256
# ISO-BMFF brands of HEIF/HEIC photos, which Pillow cannot read: named so a refusal says so.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")


class Reader(Protocol):
    """The file as `load_image` hands it over: reads checked against a deadline and, while
    `header_reads` / `header_bytes` are not None, against the header's budget."""

    head: bytes  # the first 16 bytes
    size: int
    header_reads: int | None
    header_bytes: int | None
    header_limit: int

    def read(self, size: int = -1) -> bytes: ...

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int: ...


@functools.cache
def usable_formats() -> tuple[str, ...]:
    """SUPPORTED_FORMATS that this Pillow can open."""
    Image.init()  # registers every plugin, so the list names only ones that exist
    return tuple(name for name in SUPPORTED_FORMATS if name in Image.OPEN
                 and (name != "AVIF" or features.check_module("avif")))


@dataclass
class Header:
    """What a header says: the opened image (None for ICO and WebP until decoding), and the
    estimated peak bytes of decoding it. Mutable, so the decoder can drop the image early."""

    im: Image.Image | None
    need: int


def read_header(fp: Reader, path: str | os.PathLike[str], max_pixels: int | None,
                draft_size: tuple[int, int] | None) -> Header:
    """Parse the header only and check the pixel count. ICO and WebP are sized from their
    own headers and opened later, since Pillow decodes an icon, and allocates a WebP canvas,
    inside open()."""
    kind = format_of(fp.head)
    if kind in ("ICO", "WEBP", "AVIF"):  # their openers read a whole image or file
        fp.header_bytes = None
    if kind in ("ICO", "WEBP"):
        width, height = _ico_size(fp, path) if kind == "ICO" else _webp_size(fp, path)
        _check_size(path, width, height, max_pixels)
        pixels = width * height  # RGBA, plus the decoder's canvas and copies of it
        return Header(None, _peak(4 * pixels, 13 * pixels + fp.size, pixels, width, False, True))
    if kind == "TIFF":
        _check_tiff_tags(fp, path)
    im = Image.open(fp, formats=usable_formats())
    metadata = fp.header_limit - fp.header_bytes if fp.header_bytes is not None else 0
    fp.header_reads = fp.header_bytes = None
    _check_size(path, *im.size, max_pixels)
    full = im.width * im.height  # before a draft: libjpeg's coefficients are full size
    if draft_size is not None and im.format in ("JPEG", "MPO"):
        im.draft("RGB", _stored_orientation(im, draft_size))
    pixels = im.width * im.height
    decoder = metadata  # the header bytes read, which Pillow may keep
    if im.format in ("JPEG", "MPO") and (im.info.get("progressive") or im.info.get("progression")):
        decoder += 2 * full * max(im.layers, 1)  # 16-bit DCT coefficients of every component
    elif im.format == "PNG":
        decoder += fp.size + 32 * im.width  # verify() reads a whole chunk; two rows
    elif im.format == "AVIF":
        decoder += 12 * pixels + fp.size  # YUV planes up to 16 bits and alpha, RGB, the file
    elif im.format == "TIFF":
        decoder += 400 * len(im.tile)  # Pillow's Python objects for each strip or tile
        if im.tile and im.tile[0][0] == "libtiff":
            decoder += fp.size + 2 * _tiff_buffer(im)  # the file in memory, one strip or tile
    plain = im.mode == "RGB" and not im.has_transparency_data  # to_rgb returns it as it is
    stored = pixels * (1 if im.mode in ("1", "L", "P") else 2 if im.mode.startswith("I;16") else 4)
    return Header(im, _peak(stored, decoder, pixels, im.width, plain, _may_rotate(im)))


def _peak(stored: int, decoder: int, pixels: int, width: int, plain: bool, rotate: bool) -> int:
    """Peak bytes, calibrated by measurement (docs/reliability.md, "Memory of one image"): while decoding, the image
    plus the decoder's buffers; while rotating, two copies; while converting, the image, the
    RGB result and one strip's temporaries; plus per-row buffers and a fixed margin."""
    converting = stored + (0 if plain else 4 * pixels + 24 * min(pixels, STRIP_PIXELS))
    peak = max(stored + decoder, 2 * stored if rotate else 0, converting)
    return (peak + 256 * width + (16 << 20)) * 17 // 16


def _tiff_buffer(im: Image.Image) -> int:
    """Bytes of the strip or tile libtiff decodes at once (at least 4 bytes a pixel, as when
    it converts through RGBA)."""
    bits = im.tag_v2.get(258, (8,))
    bits = sum(bits) if isinstance(bits, tuple) else int(bits) * int(im.tag_v2.get(277, 1))
    width = int(im.tag_v2.get(322, im.width))
    rows = min(int(im.tag_v2.get(323, im.tag_v2.get(278, im.height))), im.height)
    return width * rows * max((bits + 7) // 8, 4)


def _check_size(path: str | os.PathLike[str], width: int, height: int, limit: int | None) -> None:
    """Refuse empty or oversized images from the header alone, before decoding a pixel."""
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"invalid image dimensions {width}x{height}")
    if limit is not None and width * height > limit:
        raise ImageLoadError(path, f"image too large: {width}x{height} = {width * height:,} pixels "
                                   f"exceeds the limit of {limit:,} (possible decompression bomb)")


def _may_rotate(im: Image.Image) -> bool:
    """Whether EXIF may ask for a rotation (a copy of the image). A PNG may carry its EXIF
    after the pixels, where Pillow finds it only when loading: assume it may."""
    if im.format == "PNG" and "exif" not in im.info:
        return True
    return im.getexif().get(0x0112, 1) not in (1, None)


def _ico_size(fp: Reader, path: str | os.PathLike[str]) -> tuple[int, int]:
    """The largest image an ICO holds, read from each image's own header (the directory's
    sizes are hints that Pillow does not enforce)."""
    count = struct.unpack("<H", fp.read(6)[4:6])[0]
    if count > _MAX_ICO_FRAMES:
        raise ImageLoadError(path, f"unsupported ICO file: {count:,} images in one file (the "
                                   f"limit is {_MAX_ICO_FRAMES})")
    directory = fp.read(16 * count)
    best = (0, 0)
    for i in range(len(directory) // 16):
        fp.seek(struct.unpack("<I", directory[16 * i + 12:16 * i + 16])[0])
        head = fp.read(24)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 24:
            size = struct.unpack(">II", head[16:24])
        elif len(head) >= 12 and head[:4] == b"\x0c\x00\x00\x00":
            size = struct.unpack("<HH", head[4:8])
        elif len(head) >= 12:
            width, height = struct.unpack("<ii", head[4:12])
            size = (abs(width), abs(height) // 2)  # the height counts the mask too
        else:
            continue
        best = max(best, size, key=lambda s: s[0] * s[1])
    if best == (0, 0):
        raise ImageLoadError(path, "corrupt ICO file (no readable image in it)")
    return best


def _webp_size(fp: Reader, path: str | os.PathLike[str]) -> tuple[int, int]:
    """The canvas size in a WebP header (VP8X, lossy VP8 or lossless VP8L)."""
    s = fp.read(30)
    chunk = s[12:16]
    if chunk == b"VP8X" and len(s) >= 30:
        return (int.from_bytes(s[24:27], "little") + 1, int.from_bytes(s[27:30], "little") + 1)
    if chunk == b"VP8 " and len(s) >= 30 and s[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", s[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(s) >= 25 and s[20] == 0x2F:
        bits = int.from_bytes(s[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise ImageLoadError(path, "corrupt WEBP file (its header cannot be parsed)")


def _check_tiff_tags(fp: Reader, path: str | os.PathLike[str]) -> None:
    """Refuse a TIFF whose first directory holds too many strips or tiles, or too long a
    numeric tag (classic or BigTIFF, either byte order); malformed ones are left to Pillow."""
    head = fp.read(16)
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"\x2b\x00", b"\x00\x2b")
    word, entry = ("Q", 20) if big else ("I", 12)
    fp.seek(struct.unpack(order + word, head[8:16] if big else head[4:8])[0])
    raw = fp.read(8 if big else 2)
    if len(raw) == (8 if big else 2):
        count = struct.unpack(order + ("Q" if big else "H"), raw)[0]
        table = fp.read(min(count, 65_535) * entry)
        for i in range(0, len(table) - entry + 1, entry):
            tag, kind = struct.unpack(order + "HH", table[i:i + 4])
            values = struct.unpack(order + word, table[i + 4:i + (12 if big else 8)])[0]
            limit = _MAX_TIFF_PARTS if tag in _TIFF_PARTS else _MAX_TIFF_VALUES
            if kind not in (1, 2, 7) and values > limit:  # 1, 2, 7: bytes or text
                raise ImageLoadError(path, f"unsupported TIFF file: tag {tag} holds {values:,} "
                                           f"values (the limit is {limit:,})")
    fp.seek(0)


def _stored_orientation(im: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """Express a wanted upright (w, h) in the file's stored orientation, for `draft`."""
    orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation; 5-8 swap width and height
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else (size[0], size[1])


# --- wording -----------------------------------------------------------------------------


def format_of(head: bytes) -> str | None:
    """The supported format whose signature `head` carries, as Pillow's opener tests it."""
    for name in usable_formats():
        if _accepts(name, head):
            return name
    return None


def _accepts(name: str, head: bytes) -> bool:
    accept = Image.OPEN[name][1]
    try:  # only Pillow's signature test: a few byte comparisons, no parsing
        result = accept(head) if accept else False
    except Exception:  # noqa: BLE001 - a signature test choking on odd bytes means "no"
        return False
    return bool(result) and not isinstance(result, str)


def unidentified_reason(head: bytes) -> str:
    """Word Pillow's "cannot identify" by what the file looks like: a supported format with
    a broken header, a format Pillow knows that we do not decode, or not an image at all."""
    supported = usable_formats()
    name = format_of(head)
    if name:
        return f"corrupt {name} file (its header cannot be parsed)"
    names = ", ".join(supported)
    for other in Image.ID:
        if other not in supported and other != "MPO" and _accepts(other, head):
            return f"unsupported image format {other} (supported: {names})"
    if head.startswith(b"%PDF-"):
        return f"unsupported format PDF, a document (supported: {names})"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return f"unsupported image format HEIF/HEIC (supported: {names})"
    return "not an image file (cannot identify image format)"
