"""Per-word attention heatmaps drawn over the image, as one PNG per image (Pillow only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from captioner.modelfile import atomic_write

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


def write_attention_png(out_dir: str | Path, image_path: str, image: Image.Image, words: list[str],
                        attention: list[list[float]], grid_shape: tuple[int, int]) -> Path:
    """Write DIR/<image stem>.attention.png atomically; returns its path."""
    out = Path(out_dir) / f"{Path(image_path).stem}.attention.png"
    sheet = render_attention(image, words, attention, grid_shape)
    atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))
    return out
