"""Per-word attention heatmaps drawn over the image, as one PNG per image (Pillow only)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from captioner.errors import OutputError, shown_path
from captioner.outputs import atomic_write, check_output

TILE = 224


def _heat(weights: list[float], grid_shape: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """A [h,w] attention grid upsampled smoothly to the tile size: (colour, alpha mask)."""
    a = np.asarray(weights, dtype=np.float32).reshape(grid_shape)
    a = (a - a.min()) / (a.max() - a.min() + 1e-8)
    small = Image.fromarray((a * 255).astype(np.uint8), mode="L")
    mask = small.resize((TILE, TILE), Image.Resampling.BICUBIC)
    color = Image.new("RGB", (TILE, TILE), (255, 40, 0))
    return color, mask


def render_attention(image: Image.Image, words: list[str], attention: list[list[float]],
                     grid_shape: tuple[int, int], columns: int = 5) -> Image.Image:
    """The image, then one panel per word (and <end>) with its attention overlaid."""
    base = image.convert("RGB").resize((TILE, TILE), Image.Resampling.BICUBIC)
    labels = ["(image)"] + words + ["<end>"]
    panels = [base]
    for weights in attention[: len(words) + 1]:
        color, mask = _heat(weights, grid_shape)
        dim = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.45)
        panels.append(Image.composite(Image.blend(dim, color, 0.55), dim, mask))
    rows = (len(panels) + columns - 1) // columns
    label_h = 22
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (panel, label) in enumerate(zip(panels, labels)):
        x, y = (k % columns) * TILE, (k // columns) * (TILE + label_h)
        sheet.paste(panel, (x, y + label_h))
        draw.text((x + 6, y + 4), label, fill="black", font=font)
    return sheet


def write_attention_png(out: str | Path, image: Image.Image, words: list[str], attention: list[list[float]],
                        grid_shape: tuple[int, int]) -> Path:
    """Render and write one sheet to `out` atomically (an existing non-regular file is refused)."""
    sheet = render_attention(image, words, attention, grid_shape)
    atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))
    return Path(out)


class AttentionMapWriter:
    """Writes DIR/<image stem>.attention.png for each captioned image of one run.

    Two images of one name from different folders (a/x.jpg, b/x.jpg) never overwrite each
    other: the second and later get the first 8 hex digits of their path's sha256 in the name
    (x-1a2b3c4d.attention.png). The directory is checked (created, written to) when the
    writer is made, before any image is captioned.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputError(f"{shown_path(self.out_dir)}: is a file; attention maps need a directory")
        check_output(self.out_dir / ".captioner-probe", "attention maps")
        self._owner: dict[str, str] = {}  # file name -> the image path it was written for

    def path_for(self, image_path: str) -> Path:
        stem = Path(image_path).stem or "image"
        name = f"{stem}.attention.png"
        if self._owner.setdefault(name, image_path) != image_path:
            digest = hashlib.sha256(os.fsencode(image_path)).hexdigest()[:8]
            name = f"{stem}-{digest}.attention.png"
            self._owner.setdefault(name, image_path)
        return self.out_dir / name

    def write(self, result) -> Path:
        """The map of one `CaptionResult` (with attention); OutputError when it cannot be written."""
        from captioner.images import load_image
        out = self.path_for(result.image)
        try:
            return write_attention_png(out, load_image(result.image), result.words, result.attention,
                                       result.grid_shape)
        except OSError as exc:  # disk full, directory removed meanwhile: stop, one line
            raise OutputError(f"{shown_path(out)}: cannot write the attention map ({exc.strerror or exc})") from None
