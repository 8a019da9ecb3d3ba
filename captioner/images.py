"""Safe image loading and image-path expansion.

Every image the package touches (training, feature caching, `captioner caption`) goes through
`load_image`, so one bad file costs one clear one-line error ("PATH: reason") instead of a
traceback halfway through an epoch, and every image reaches the encoder as 8-bit RGB the right
way up. The rules:

* Only raster formats with well-exercised decoders are opened (no EPS, which runs
  Ghostscript, and none of Pillow's exotic plugins).
* Size is checked from the header before any pixel is decoded (decompression bombs).
* Decoding is complete and strict: a truncated file or a bad PNG checksum is an error, never a
  silently grey-padded image.
* EXIF orientation is applied; transparency is composited onto white (what a viewer shows);
  16-bit and 32-bit greyscale are rescaled to 8 bits rather than clipped.
"""
from __future__ import annotations

import glob
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from PIL import Image, ImageFile, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "ImageLoadError", "find_images", "load_image", "to_rgb"]

# Pillow's own default limit (about 89.5 megapixels, a 9459 x 9459 image).
DEFAULT_MAX_PIXELS = 89_478_485

# Extensions picked up when a directory or glob is expanded (compared lower-cased). A file
# named explicitly is tried whatever its extension.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm", ".pnm", ".avif"}
)

# Formats we let Pillow try. Restricting this keeps a mislabelled file away from plugins that
# shell out (EPS) or are rarely fuzzed.
_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")

# Leading bytes of the formats above, only to word the error for a file that claims to be an
# image but whose header Pillow rejects ("corrupt PNG file" rather than "not an image").
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

# Exceptions Pillow's decoders raise on bad content. Anything else is a bug, not a bad file.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, struct.error,
    EOFError, OverflowError, ZeroDivisionError, MemoryError,
)


class ImageLoadError(ValueError):
    """An image that cannot be used; str() is the one-line "PATH: reason" shown to users."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = _one_line(reason)
        # Escape line breaks in the path (rather than collapse its spaces, which would change it).
        shown = self.path.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(f"{shown}: {self.reason}")


def _one_line(text: str) -> str:
    """Collapse whitespace runs so a message can never break one-line-per-image output."""
    return " ".join(str(text).split())


def load_image(
    path: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode `path` fully into an upright 8-bit RGB image, or raise `ImageLoadError`.

    `max_pixels` refuses images whose header declares more pixels, before decoding them.
    `draft_size` (width, height) lets a JPEG decode at 1/2, 1/4 or 1/8 scale while staying at
    least that large, which makes big photos several times cheaper when the caller will
    downscale anyway; the result is then not the file's full size.
    """
    with _open_file(path) as fp:
        try:
            with warnings.catch_warnings():
                # Our own `max_pixels` check below decides; Pillow's warning would only be noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return _decode(fp, path, max_pixels, draft_size)
        except ImageLoadError:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's own limit, hit inside open()
            raise ImageLoadError(path, f"image too large ({exc})") from None
        except Image.UnidentifiedImageError:
            raise ImageLoadError(path, _unidentified_reason(fp)) from None
        except _DECODE_ERRORS as exc:
            raise ImageLoadError(path, _decode_reason(exc)) from None


@contextmanager
def _open_file(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open for reading, turning the file-system failures into their user-facing reasons."""
    if os.path.isdir(path):
        raise ImageLoadError(path, "is a directory, not an image file")
    try:
        fp = open(path, "rb")
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot open ({exc.strerror or exc})") from None
    with fp:
        if os.fstat(fp.fileno()).st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
        yield fp


def _decode(
    fp: IO[bytes],
    path: str | os.PathLike[str],
    max_pixels: int,
    draft_size: tuple[int, int] | None,
) -> Image.Image:
    Image.init()  # registers every plugin, so `formats` below names only ones that exist
    formats = [name for name in _FORMATS if name in Image.OPEN]
    im = Image.open(fp, formats=formats)
    _check_size(im, path, max_pixels)
    if im.format == "PNG":
        # Pillow's normal PNG decode skips the pixel chunks' CRCs; verify() checks them all
        # (raising SyntaxError) but leaves the image unusable, so open it again.
        im.verify()
        fp.seek(0)
        im = Image.open(fp, formats=["PNG"])
    if draft_size is not None and im.format in ("JPEG", "MPO"):
        im.draft("RGB", _stored_orientation(im, draft_size))
    with _strict_truncation():
        im.load()
    im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def _check_size(im: Image.Image, path: str | os.PathLike[str], max_pixels: int) -> None:
    """Refuse empty or oversized images from the header alone, before decoding a pixel."""
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"invalid image dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageLoadError(
            path,
            f"image too large: {width}x{height} = {width * height:,} pixels exceeds the limit "
            f"of {max_pixels:,} (possible decompression bomb)",
        )


def _stored_orientation(im: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """Express a wanted upright (w, h) in the file's stored orientation, for `draft`."""
    orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation; 5-8 swap width and height
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else (size[0], size[1])


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
    """Convert any decoded mode to 8-bit RGB the way an image viewer would show it."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = _high_depth_to_l(im)
    if im.has_transparency_data:  # alpha channel, or a tRNS colour in P, L or RGB images
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """Rescale 16/32-bit greyscale to 8 bits; Pillow's own convert("L") clips at 255.

    16-bit data maps 0..65535 onto 0..255. 32-bit integer or float data has no fixed range,
    so its own minimum..maximum is stretched over 0..255 unless it already fits 16 bits.
    """
    wide = im.convert("F")  # 32-bit float holds every value of every such mode exactly
    low, high = wide.getextrema()
    if im.mode.startswith("I;16") or (im.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    scale = 255.0 / (high - low) if high > low else 0.0
    return wide.point(lambda v: (v - low) * scale + 0.5).convert("L")  # +0.5: round, not floor


def _unidentified_reason(fp: IO[bytes]) -> str:
    """Word Pillow's "cannot identify" by whether the file at least looks like an image."""
    fp.seek(0)
    head = fp.read(16)
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return f"corrupt {name} file (its header cannot be parsed)"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "corrupt WebP file (its header cannot be parsed)"
    return "not an image file (cannot identify image format)"


def _decode_reason(exc: BaseException) -> str:
    """Turn a decoder exception into a short reason a user can act on."""
    detail = _one_line(str(exc)) or type(exc).__name__
    if "truncated" in detail.lower() or isinstance(exc, EOFError):
        return f"truncated image file ({detail})"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode the image"
    return f"corrupt image data ({detail})"


def find_images(paths: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, directories and globs into image paths, reporting what matched nothing.

    Returns (images in the order given, each once) and [(given path, reason)]. A file named
    explicitly is kept whatever its extension, since `load_image` judges content, not names;
    directories (searched recursively) and globs contribute only image extensions, skipping
    hidden files such as macOS "._x.jpg" resource forks.
    """
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for given in paths:
        matches, reason = _expand(given)
        if reason:
            problems.append((given, reason))
        for path in matches:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                found.append(path)
    return found, problems


def _expand(given: str) -> tuple[list[Path], str]:
    """One command-line argument -> (image paths, reason it yielded none or "")."""
    if os.path.isdir(given):
        images = _images_under(given)
        return images, "" if images else "no images found in directory"
    if os.path.lexists(given):
        return [Path(given)], ""
    matched = sorted(glob.glob(given, recursive=True))
    if not matched:
        return [], "no such file or directory"
    images: list[Path] = []
    for match in matched:
        if os.path.isdir(match):
            images.extend(_images_under(match))
        elif _is_image_name(match):
            images.append(Path(match))
    return images, "" if images else "no images match this pattern"


def _images_under(directory: str) -> list[Path]:
    """Image files below `directory`, recursively, in sorted path order."""
    images = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        images.extend(Path(dirpath, name) for name in filenames if _is_image_name(name))
    return sorted(images)


def _is_image_name(name: str) -> bool:
    base = os.path.basename(name)
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS
