"""load_image / find_images on every odd or broken input we could think of, all generated here."""
from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from captioner.images import IMAGE_EXTENSIONS, ImageLoadError, find_images, load_image


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


def test_eps_is_not_handed_to_ghostscript(tmp_path):
    path = tmp_path / "x.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    _assert_refused(path, "not an image file")


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
    import captioner.images as images

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    path = _save(_gradient(), tmp_path / "locked.jpg")
    monkeypatch.setattr(images, "open", refuse, raising=False)
    _assert_refused(path, "permission denied")


def test_error_is_a_single_line_even_for_odd_paths():
    err = ImageLoadError("dir/line\nbreak.jpg", "bad\nthing")
    assert str(err) == "dir/line\\nbreak.jpg: bad thing"
    assert isinstance(err, ValueError)
    assert str(ImageLoadError("two  spaces.jpg", "x")) == "two  spaces.jpg: x"
    assert err.path == "dir/line\nbreak.jpg" and err.reason == "bad thing"


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


# --- find_images -----------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path) -> Path:
    for name in ["b.jpg", "a.PNG", "notes.txt", ".hidden.jpg", "sub/c.JPEG", "sub/deeper/d.webp",
                 ".git/e.jpg", "empty/readme.md"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path


def test_find_images_expands_directories_recursively_and_sorted(tree):
    found, problems = find_images([str(tree)])
    assert [p.relative_to(tree).as_posix() for p in found] == [
        "a.PNG", "b.jpg", "sub/c.JPEG", "sub/deeper/d.webp"]
    assert problems == []


def test_find_images_keeps_explicit_files_and_reports_misses(tree):
    given = [str(tree / "notes.txt"), str(tree / "nope.jpg"), str(tree / "empty"),
             str(tree / "b.jpg")]
    found, problems = find_images(given)
    assert found == [tree / "notes.txt", tree / "b.jpg"]
    assert problems == [(given[1], "no such file or directory"),
                        (given[2], "no images found in directory")]


def test_find_images_globs_and_dedup(tree):
    found, problems = find_images([str(tree / "**" / "*.*"), str(tree / "b.jpg"),
                                   f"{tree}/./b.jpg", str(tree / "*.gif")])
    assert [p.relative_to(tree).as_posix() for p in found] == [
        "a.PNG", "b.jpg", "sub/c.JPEG", "sub/deeper/d.webp"]
    assert problems == [(str(tree / "*.gif"), "no such file or directory")]


def test_find_images_glob_matching_only_non_images(tree):
    found, problems = find_images([str(tree / "*.txt")])
    assert found == [] and problems == [(str(tree / "*.txt"), "no images match this pattern")]


def test_image_extensions_are_lower_case_with_dot():
    assert {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
