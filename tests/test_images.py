"""load_image on every odd, broken or hostile input we could think of, all generated here."""
from __future__ import annotations

import io
import os
import random
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from captioner import errors, images
from captioner.images import (
    IMAGE_EXTENSIONS,
    SUPPORTED_FORMATS,
    ImageLoadError,
    estimate_decode_bytes,
    load_image,
    to_rgb,
)


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def _gradient(width: int = 64, height: int = 48) -> Image.Image:
    """A non-uniform RGB image, so corruption and draft scaling have something to change."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose (valid-CRC) header claims `width` x `height` with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _png_header(width: int, height: int, colour_type: int, bit_depth: int = 8) -> bytes:
    """A PNG signature and a valid IHDR for any size and colour type, with no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"")))


def _sparse(path: Path, head: bytes, size: int) -> Path:
    """`head` followed by zeros up to `size` bytes, which take no disk space."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def _within(seconds: float, fn, *args, **kwargs):
    """Run `fn` in a thread; fail (rather than hang the suite) if it has not returned in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    box["elapsed"] = time.monotonic() - start
    return box


def _assert_rgb(im: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(im, Image.Image)
    assert im.mode == "RGB"
    assert im.size == size


def _assert_refused(path: Path, *words: str, **kw) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path, **kw)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert info.value.path == str(path)
    for word in words:
        assert word in info.value.reason
    return info.value


# --- images that must load -------------------------------------------------------------------

def test_jpeg_loads_as_rgb(tmp_path):
    _assert_rgb(load_image(_save(_gradient(), tmp_path / "a.jpg")), (64, 48))


def test_accepts_str_and_path(tmp_path):
    path = _save(_gradient(), tmp_path / "a.png")
    assert load_image(str(path)).tobytes() == load_image(path).tobytes()


def test_one_by_one_png(tmp_path):
    im = load_image(_save(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "dot.png"))
    _assert_rgb(im, (1, 1))
    assert im.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("fmt,ext", [("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tif"),
                                     ("PPM", "ppm")])
def test_other_formats(tmp_path, fmt, ext):
    path = _save(_gradient(), tmp_path / f"a.{ext}", format=fmt, **({"lossless": True}
                                                                     if fmt == "WEBP" else {}))
    im = load_image(path)
    _assert_rgb(im, (64, 48))
    assert im.tobytes() == _gradient().tobytes()


def test_greyscale_and_one_bit(tmp_path):
    grey = load_image(_save(Image.new("L", (5, 4), 77), tmp_path / "l.png"))
    _assert_rgb(grey, (5, 4))
    assert grey.getpixel((0, 0)) == (77, 77, 77)
    bits = Image.new("1", (8, 3), 0)
    bits.putpixel((1, 1), 1)
    im = load_image(_save(bits, tmp_path / "bits.png"))
    _assert_rgb(im, (8, 3))
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    im = load_image(path)
    _assert_rgb(im, (4, 1))
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_thirty_two_bit_greyscale_is_scaled(tmp_path):
    values = np.array([[0, 1000, 70000, 140000]], dtype=np.int32)
    im = load_image(_save(Image.fromarray(values, "I"), tmp_path / "deep.tif"))
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [0, 2, 128, 255]


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    assert Image.open(path).mode == "CMYK"
    im = load_image(path)
    _assert_rgb(im, (16, 16))
    r, g, b = im.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 100%, 100%, 0) is red


def test_palette_gif(tmp_path):
    im = Image.new("P", (6, 6), 0)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((2, 2), 1)
    out = load_image(_save(im, tmp_path / "pal.gif"))
    _assert_rgb(out, (6, 6))
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((2, 2)) == (200, 100, 50)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    out = load_image(path)
    _assert_rgb(out, (8, 8))
    assert out.getpixel((4, 4)) == (255, 0, 0)


def test_transparency_composites_onto_white(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    out = load_image(_save(rgba, tmp_path / "rgba.png"))
    _assert_rgb(out, (4, 1))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 0)
    assert 120 <= out.getpixel((2, 0))[0] <= 135

    la = load_image(_save(Image.new("LA", (2, 2), (0, 0)), tmp_path / "la.png"))
    assert la.getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = load_image(_save(pal, tmp_path / "pal.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (9, 9, 9)

    rgb = Image.new("RGB", (2, 1), (0, 255, 0))
    rgb.putpixel((1, 0), (5, 6, 7))
    out = load_image(_save(rgb, tmp_path / "trns.png", transparency=(0, 255, 0)))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (5, 6, 7)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(_save(im, tmp_path / "rot.jpg", exif=exif, quality=95))
    _assert_rgb(out, (20, 40))
    assert out.getpixel((10, 2))[0] > 200  # the left band is now along the top
    assert out.getpixel((10, 37))[0] < 50


def test_unusual_path_names(tmp_path):
    (tmp_path / "a dir ✓").mkdir()
    path = _save(_gradient(), tmp_path / "a dir ✓" / "phôto 1.jpg")
    _assert_rgb(load_image(path), (64, 48))
    broken = tmp_path / "a dir ✓" / "bröken file.jpg"
    broken.write_bytes(b"nope")
    _assert_refused(broken, "not an image")


# --- images that must be refused -------------------------------------------------------------

def test_missing_file(tmp_path):
    _assert_refused(tmp_path / "missing.jpg", "no such file")


def test_directory_named_like_an_image(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    _assert_refused(tmp_path / "x.jpg", "directory")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").touch()
    _assert_refused(tmp_path / "empty.jpg", "empty")


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")
    err = _assert_refused(path, "not an image file")
    assert str(err) == f"{path}: not an image file (cannot identify image format)"


def test_eps_is_named_and_not_handed_to_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    path = tmp_path / "x.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    err = _assert_refused(path, "unsupported image format EPS (supported: JPEG, PNG")
    assert "ICO" in err.reason


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.1])
def test_truncated_jpeg(tmp_path, keep):
    data = (_save(_gradient(), tmp_path / "full.jpg")).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * keep)])
    _assert_refused(path)


def test_truncated_even_when_lenient_loading_is_on(tmp_path, monkeypatch):
    data = _save(_gradient(), tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _assert_refused(tmp_path / "cut.jpg", "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_truncated_png(tmp_path):
    data = _save(_gradient(), tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _assert_refused(tmp_path / "cut.png")


@pytest.mark.parametrize("chunk", [b"IHDR", b"IDAT"])
def test_png_with_bad_crc(tmp_path, chunk):
    data = bytearray(_save(_gradient(), tmp_path / "good.png").read_bytes())
    start = data.find(chunk)
    (length,) = struct.unpack(">I", data[start - 4:start])
    data[start + 4 + length] ^= 0xFF  # first byte of the chunk's CRC
    (tmp_path / "bad.png").write_bytes(bytes(data))
    _assert_refused(tmp_path / "bad.png", "PNG")


def test_decompression_bomb_header_is_refused_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(60_000, 60_000))  # 3.6 gigapixels, 80 bytes on disk
    _assert_refused(path, "too large")


def test_image_just_over_max_pixels(tmp_path):
    path = _save(_gradient(100, 100), tmp_path / "a.jpg")
    _assert_refused(path, "too large", "10,000", max_pixels=9_999)
    _assert_rgb(load_image(path, max_pixels=10_000), (100, 100))


def test_pillow_bomb_limit_is_refused_too(tmp_path):
    # Between Pillow's warning and error thresholds, with our limit raised past both.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20_000, 10_000))
    _assert_refused(path, "too large", max_pixels=10**12)


def test_zero_dimensions(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(_png_header_only(0, 10))
    _assert_refused(path)


def test_unreadable_file(tmp_path):
    path = _save(_gradient(), tmp_path / "secret.jpg")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading")
        _assert_refused(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_permission_error_is_reported(tmp_path, monkeypatch):
    # Root reads through chmod 000, so also check the mapping with open() itself refusing.
    path = _save(_gradient(), tmp_path / "locked.jpg")
    real_open = os.open

    def refuse(name, *args, **kwargs):
        if os.fspath(name) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    _assert_refused(path, "permission denied")


def test_error_is_a_single_line_even_for_odd_paths():
    err = ImageLoadError("dir/line\nbreak.jpg", "bad\nthing")
    assert str(err) == "dir/line\\nbreak.jpg: bad thing"
    assert isinstance(err, ValueError)
    assert str(ImageLoadError("two  spaces.jpg", "x")) == "two  spaces.jpg: x"
    assert err.path == "dir/line\nbreak.jpg" and err.reason == "bad thing"
    assert images.ImageLoadError is errors.ImageLoadError  # one class, re-exported
    assert isinstance(err, errors.CaptionerError)


# --- draft decoding --------------------------------------------------------------------------

def test_draft_decodes_large_jpeg_at_reduced_scale(tmp_path):
    path = _save(_gradient(4000, 3000), tmp_path / "big.jpg", quality=80)
    small = load_image(path, draft_size=(224, 224))
    assert small.mode == "RGB"
    assert 224 <= min(small.size) and small.size[0] < 4000
    assert small.size == (500, 375)  # 1/8 scale still covers 224 x 224
    full = load_image(path)
    assert full.size == (4000, 3000)
    # The reduced decode shows the same picture.
    reference = np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(np.asarray(small, dtype=np.int16) - reference).mean() < 8


def test_draft_respects_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(_gradient(800, 400), tmp_path / "rot.jpg", exif=exif)
    out = load_image(path, draft_size=(200, 400))  # wanted upright: 200 wide, 400 high
    assert out.size == (200, 400)


def test_draft_ignored_for_png(tmp_path):
    path = _save(_gradient(400, 300), tmp_path / "a.png")
    assert load_image(path, draft_size=(50, 50)).size == (400, 300)


# --- fuzz ------------------------------------------------------------------------------------

def _mutants(data: bytes, rng: random.Random, count: int):
    for _ in range(count):
        blob = bytearray(data)
        if rng.random() < 0.3:
            blob = blob[: rng.randrange(1, len(blob))]
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        yield bytes(blob)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_fuzzed_files_give_image_or_load_error(tmp_path, fmt):
    buffer = io.BytesIO()
    _gradient(32, 24).save(buffer, format=fmt)
    rng = random.Random(f"captioner-{fmt}")
    path = tmp_path / "fuzz.img"
    outcomes = {"image": 0, "error": 0}
    for blob in _mutants(buffer.getvalue(), rng, 200):
        path.write_bytes(blob)
        try:
            im = load_image(path, max_pixels=4_000_000)
        except ImageLoadError as err:
            assert "\n" not in str(err) and str(err).startswith(f"{path}: ")
            outcomes["error"] += 1
        else:
            assert isinstance(im, Image.Image) and im.mode == "RGB"
            outcomes["image"] += 1
    assert outcomes["error"] > 0


# --- formats and extensions ------------------------------------------------------------

def test_image_extensions_are_lower_case_with_dot():
    assert {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)



def test_supported_formats_are_what_is_decoded(tmp_path):
    assert SUPPORTED_FORMATS[:2] == ("JPEG", "PNG") and "EPS" not in SUPPORTED_FORMATS
    assert {".ico", ".jpg", ".png", ".webp", ".tif"} <= IMAGE_EXTENSIONS


@pytest.mark.parametrize("frames", ["png", "bmp"])
def test_ico_loads(tmp_path, frames):
    path = tmp_path / "icon.ico"
    _gradient(48, 48).convert("RGBA").save(path, sizes=[(16, 16), (48, 48)], bitmap_format=frames)
    im = load_image(path)
    _assert_rgb(im, (48, 48))
    assert im.tobytes() == _gradient(48, 48).tobytes()


def test_avif_loads_where_pillow_has_it(tmp_path):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("Pillow built without AVIF")
    path = _save(_gradient(), tmp_path / "a.avif", quality=90)
    im = load_image(path)
    _assert_rgb(im, (64, 48))
    assert np.abs(np.asarray(im, np.int16) - np.asarray(_gradient(), np.int16)).mean() < 8


def test_ico_holding_a_huge_png_is_refused_before_decoding(tmp_path):
    # The directory says 16x16; the PNG inside says 20000x20000. Pillow decodes an icon
    # while opening it, so the size must be judged from the embedded header first.
    png = _png_header(20_000, 20_000, 6)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    path = tmp_path / "liar.ico"
    path.write_bytes(b"\x00\x00\x01\x00\x01\x00" + entry + png)
    _assert_refused(path, "too large", "20000x20000")


def test_webp_canvas_is_sized_before_pillow_allocates_it(tmp_path):
    # A VP8X header declaring a 12000x12000 canvas: Pillow would allocate 576 MB in open().
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (11999).to_bytes(3, "little") * 2
    path = tmp_path / "canvas.webp"
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x)
    _assert_refused(path, "too large", "12000x12000")
    _assert_refused(path, "MiB to decode", max_pixels=10**9, max_decode_bytes=100 * 2**20)


@pytest.mark.parametrize("head, name", [
    (b"8BPS\x00\x01" + b"\x00" * 20, "unsupported image format PSD"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "unsupported format PDF"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "unsupported image format HEIF/HEIC"),
])
def test_unsupported_formats_are_named(tmp_path, head, name):
    path = tmp_path / "file.jpg"
    path.write_bytes(head + b"\x00" * 64)
    err = _assert_refused(path, name, "(supported: JPEG, PNG, GIF")
    assert "not an image" not in err.reason


# --- hostile inputs: only regular files, never blocking ---------------------------------------

def test_fifo_without_writer_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    box = _within(5, load_image, fifo)
    assert isinstance(box.get("error"), ImageLoadError), box
    assert box["error"].reason == "not a regular file (FIFO)"
    assert str(box["error"]) == f"{fifo}: not a regular file (FIFO)"


def test_fifo_swapped_in_after_the_check_does_not_block(tmp_path, monkeypatch):
    # The path is a regular file when checked and a FIFO when opened: the non-blocking open
    # and the check of what was opened still refuse it.
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    regular = os.stat(_save(_gradient(), tmp_path / "real.jpg"))
    real_stat = os.stat

    def lying_stat(name, *args, **kwargs):
        return regular if os.fspath(name) == str(fifo) else real_stat(name, *args, **kwargs)

    monkeypatch.setattr(os, "stat", lying_stat)
    box = _within(5, load_image, fifo)
    assert isinstance(box.get("error"), ImageLoadError), box
    assert box["error"].reason == "not a regular file (FIFO)"


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero", "/dev/urandom"])
def test_character_devices_are_refused(device):
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist here")
    box = _within(5, load_image, device)
    assert str(box["error"]) == f"{device}: not a regular file (character device)"


def test_block_device_is_refused_without_opening_it():
    devices = [entry.path for entry in os.scandir("/dev")
               if stat.S_ISBLK(entry.stat(follow_symlinks=False).st_mode)]
    if not devices:
        pytest.skip("no block device here")
    box = _within(5, load_image, devices[0])
    assert box["error"].reason == "not a regular file (block device)"


def test_socket_and_directory_are_refused(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    _assert_refused(tmp_path / "d.jpg", "not a regular file (directory)")
    path = tmp_path / "s.jpg"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
    except OSError:
        pytest.skip("cannot bind a Unix socket here")
    try:
        _assert_refused(path, "not a regular file (socket)")
    finally:
        server.close()


# --- hostile inputs: bounded size, memory and time -------------------------------------------

def test_sparse_two_gigabyte_file_is_refused_instantly(tmp_path):
    path = _sparse(tmp_path / "huge.jpg", b"\xff\xd8\xff\xe0", 2 * 2**30)
    start = time.monotonic()
    err = _assert_refused(path, "file too large", "2,147,483,648 bytes", "268,435,456")
    assert time.monotonic() - start < 0.5, err


def test_max_bytes_is_the_limit(tmp_path):
    path = _save(_gradient(), tmp_path / "a.png")
    size = path.stat().st_size
    _assert_refused(path, "file too large", max_bytes=size - 1)
    _assert_rgb(load_image(path, max_bytes=size), (64, 48))


@pytest.mark.parametrize("junk", [b"\x00", b"\xff"])
def test_jpeg_marker_then_twenty_megabytes_of_junk_is_refused_at_once(tmp_path, junk):
    # Pillow scans junk after a JPEG marker one byte at a time (minutes for 20 MB); the cap
    # on header reads refuses it within a fraction of a second, with the default settings.
    path = tmp_path / "junk.jpg"
    if junk == b"\x00":
        _sparse(path, b"\xff\xd8\xff", 20_000_000)
    else:
        path.write_bytes(b"\xff\xd8\xff" + junk * 2_000_000)
    box = _within(10, load_image, path)
    err = box.get("error")
    assert isinstance(err, ImageLoadError), box
    assert err.reason.startswith("corrupt JPEG file (header parsing gave up at byte"), err
    assert box["elapsed"] < 2.0


def _tiff_with_strips(path: Path, strips: int) -> Path:
    """A 1-pixel-wide greyscale TIFF of `strips` rows, one strip each: its strip offsets and
    byte counts take 8 bytes a strip, all zeros (sparse)."""
    entries = [(256, 4, 1, 1), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, strips, 4096), (278, 4, 1, 1),
               (279, 4, strips, 4096 + 4 * strips)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    return _sparse(path, b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4, 4096 + 8 * strips)


def test_tiff_with_millions_of_strips_is_refused_at_once(tmp_path):
    # 40 MB of zeros from which Pillow would build 10 million ints and 5 million tiles.
    path = _tiff_with_strips(tmp_path / "strips.tif", 5_000_000)
    box = _within(5, load_image, path)
    assert box["error"].reason == ("unsupported TIFF file: tag 273 holds 5,000,000 values "
                                   "(the limit is 65,536)")
    assert box["elapsed"] < 1


def test_tiff_with_many_strips_within_the_limit_loads(tmp_path):
    path = _tiff_with_strips(tmp_path / "strips.tif", 2000)
    im = load_image(path)
    _assert_rgb(im, (1, 2000))


def test_metadata_before_the_pixels_is_capped(tmp_path, monkeypatch):
    exif_free = io.BytesIO()
    _gradient().save(exif_free, format="JPEG")
    data = exif_free.getvalue()
    comment = b"\xff\xfe" + struct.pack(">H", 60_002) + b"x" * 60_000  # 60 kB COM segment
    path = tmp_path / "chatty.jpg"
    path.write_bytes(data[:2] + comment * 5 + data[2:])  # 300 kB before the image data
    _assert_rgb(load_image(path), (64, 48))
    monkeypatch.setattr(images, "_MAX_HEADER_BYTES", 2**18)
    _assert_refused(path, "JPEG header larger than 0.25 MiB (the limit for the metadata before")


def test_deadline_cuts_off_a_slow_pixel_decode(tmp_path, monkeypatch):
    # A clock that moves one second per read once the header is parsed: the pixel decode
    # is cut off part way, between two of its reads.
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1500, 3), dtype=np.uint8)
    path = _save(Image.fromarray(noise), tmp_path / "noise.jpg", quality=95)  # ~1.5 MB
    now = [0.0]
    read = images._GuardedFile.read

    def slow_read(self, size=-1):
        if self.header_reads is None:
            now[0] += 1.0
        return read(self, size)

    monkeypatch.setattr(images.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(images._GuardedFile, "read", slow_read)
    err = _assert_refused(path, "image took longer than 2 s to decode (gave up at byte ",
                          max_seconds=2)
    stopped = int(err.reason.split("gave up at byte ")[1].split()[0].replace(",", ""))
    assert 1000 < stopped < path.stat().st_size
    assert err.reason.endswith(f"of {path.stat().st_size:,})")


def test_every_read_goes_through_the_guard(tmp_path, monkeypatch):
    # The header and the pixel data alike: the deadline covers the whole decode.
    path = _save(_gradient(2000, 1500), tmp_path / "big.jpg", quality=95)
    seen = []
    read = images._GuardedFile.read

    def spy(self, size=-1):
        data = read(self, size)
        seen.append(self.tell())
        return data

    monkeypatch.setattr(images._GuardedFile, "read", spy)
    load_image(path)
    assert max(seen) == path.stat().st_size and len(seen) > 3


def test_small_max_seconds_refuses_even_a_good_image(tmp_path):
    path = _save(_gradient(), tmp_path / "a.jpg")
    _assert_refused(path, "took longer than", max_seconds=-1)
    _assert_rgb(load_image(path, max_seconds=5), (64, 48))


def test_huge_rgba_png_header_is_judged_by_memory_without_allocating(tmp_path):
    path = tmp_path / "rgba.png"
    path.write_bytes(_png_header(9400, 9400, 6))  # 88 megapixels RGBA, a few bytes on disk
    need = estimate_decode_bytes(path)
    pixels = 9400 * 9400
    assert 8 * pixels < need < 10 * pixels  # RGBA decode + RGB result + strip temporaries
    start = time.monotonic()
    err = _assert_refused(path, "MiB to decode", f"{600:,} MiB", max_decode_bytes=600 * 2**20)
    assert time.monotonic() - start < 0.5, err
    # Grey needs a quarter of the decode memory: the bound follows mode, not pixel count.
    grey = tmp_path / "grey.png"
    grey.write_bytes(_png_header(9400, 9400, 0))
    assert estimate_decode_bytes(grey) < need * 3 // 4


def test_estimate_covers_bit_depth_and_draft(tmp_path):
    deep = tmp_path / "deep.png"
    deep.write_bytes(_png_header(4000, 4000, 0, bit_depth=16))
    grey = tmp_path / "grey.png"
    grey.write_bytes(_png_header(4000, 4000, 0))
    assert estimate_decode_bytes(deep) > estimate_decode_bytes(grey)
    photo = _save(_gradient(4000, 3000), tmp_path / "photo.jpg")
    assert estimate_decode_bytes(photo, draft_size=(224, 224)) < estimate_decode_bytes(photo) / 2
    _assert_rgb(load_image(photo, draft_size=(224, 224), max_decode_bytes=estimate_decode_bytes(
        photo, draft_size=(224, 224))), (500, 375))


def test_estimate_refuses_what_load_image_refuses(tmp_path):
    (tmp_path / "notes.jpg").write_text("not pixels\n")
    with pytest.raises(ImageLoadError, match="not an image file"):
        estimate_decode_bytes(tmp_path / "notes.jpg")
    with pytest.raises(ImageLoadError, match="not a regular file"):
        estimate_decode_bytes(tmp_path)


# Runs in a fresh interpreter per image (freed memory would hide a later peak): the peak
# resident memory of load_image, against the estimate.
_MEASURE = r"""
import json, sys
from captioner.images import estimate_decode_bytes, load_image
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
small, path = sys.argv[1:]
load_image(small)  # load the codec and the package first
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current size
base = peak()
image = load_image(path)
print(json.dumps([peak() - base, estimate_decode_bytes(path)]))
"""


@pytest.mark.parametrize("name, mode, options", [
    ("rgba.png", "RGBA", {"compress_level": 1}),
    ("prog.jpg", "RGB", {"progressive": True, "subsampling": 0}),
    ("grey.gif", "L", {}),
])
def test_decode_memory_estimate_is_an_upper_bound(tmp_path, name, mode, options):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    big, small = (_gradient(*size).convert(mode) for size in ((2400, 1800), (16, 16)))
    if mode == "RGBA":
        big.putalpha(big.getchannel(0))
    paths = [_save(im, tmp_path / f"{stem}-{name}", **options)
             for stem, im in (("s", small), ("b", big))]
    out = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, paths)], check=False,
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    measured, estimated = map(int, out.stdout.strip("[]\n").split(","))
    assert measured > 2400 * 1800  # at least the image itself was seen
    assert measured <= estimated <= 2 * measured + (40 << 20), (measured, estimated)


# --- conversion in strips is exact ---------------------------------------------------------

def _random_image(mode: str, size=(97, 61)) -> Image.Image:
    rng = np.random.default_rng(sum(map(ord, mode)))
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        high = {"I;16": 65535, "I": 300_000, "F": 5000}[mode]
        im = Image.fromarray(rng.integers(0, high, size[::-1]).astype(dtype))
        assert im.mode == mode
        return im
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    im = Image.frombytes(mode, size, data.tobytes())
    if mode == "P":
        im.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        im.info["transparency"] = 3
    return im


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16", "I", "F", "RGB"])
def test_strip_conversion_matches_whole_image_conversion(monkeypatch, mode):
    im = _random_image(mode)
    if mode == "RGB":
        im.info["transparency"] = tuple(im.getpixel((0, 0)))
    whole = to_rgb(im)
    monkeypatch.setattr(images, "_STRIP_PIXELS", 500)  # 5 rows a strip: 13 strips
    strips = to_rgb(im)
    assert strips.mode == whole.mode == "RGB" and strips.size == whole.size
    assert strips.tobytes() == whole.tobytes()
