"""What a person looks at: one class palette, colour masks, legends and contact sheets.

Class-id masks (``seg_*.png``) stay grey id PNGs for every reader; these helpers draw the
pictures beside them. ``class_palette`` is the one palette of the project (the preview, the
pair folder's contact sheet and ``python -m stedm.qc`` use it), so a class has the same colour
everywhere.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from stedm.data.pair_folder import Pairs

# Background black, then well-separated colours (Sasha Trubetskoy's "20 distinct colours").
_BASE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                  [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
                  [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200],
                  [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128]],
                 dtype=np.uint8)
IGNORE_COLOUR = np.array([128, 128, 128], dtype=np.uint8)  # pixels outside 0..num_classes-1


def class_palette(num_classes: int) -> np.ndarray:
    """``num_classes x 3`` uint8 RGB colours; class 0 (background) is black. Deterministic."""
    if int(num_classes) < 1:
        raise ValueError(f"class_palette: num_classes must be >= 1, got {num_classes}")
    n = int(num_classes)
    if n <= len(_BASE):
        return _BASE[:n].copy()
    extra = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95) for i in range(n - len(_BASE))]
    return np.concatenate([_BASE, (np.array(extra) * 255).round().astype(np.uint8)])


def colour_mask(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """H x W class ids -> H x W x 3 uint8 colours; ids outside the palette (ignore) are grey."""
    mask = np.asarray(mask)
    palette = np.asarray(palette, dtype=np.uint8)
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    out[...] = IGNORE_COLOUR
    valid = (mask >= 0) & (mask < len(palette))
    out[valid] = palette[mask[valid].astype(np.int64)]
    return out


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Class colours blended over the image; background (0) and ignored pixels stay as they are."""
    colours = colour_mask(mask, palette).astype(np.float32)
    blend = ((1 - alpha) * image[..., :3] + alpha * colours).astype(np.uint8)
    keep = (mask <= 0) | (mask >= len(palette))
    blend[keep] = image[..., :3][keep]
    return blend


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _tile(array: np.ndarray, size: int) -> Image.Image:
    """An image (H x W x 3 or H x W class colours) scaled to fit ``size`` (nearest: pixels stay crisp)."""
    image = Image.fromarray(np.ascontiguousarray(array[..., :3] if array.ndim == 3 else array))
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.NEAREST if scale >= 1 else Image.BILINEAR)


def legend(class_names: Sequence[str], palette: np.ndarray, width: int, font_size: int = 14) -> Image.Image:
    """A strip of colour swatches with the class names (wrapping to as many lines as needed)."""
    font, pad, box = _font(font_size), 8, font_size
    items, x, y, line = [], pad, pad, font_size + pad
    for i, name in enumerate(class_names):
        text = f"{i} {name}"
        w = box + 6 + int(font.getlength(text)) + 2 * pad
        if x + w > width and x > pad:
            x, y = pad, y + line
        items.append((x, y, i, text))
        x += w
    strip = Image.new("RGB", (width, y + line + pad), "white")
    draw = ImageDraw.Draw(strip)
    for x, y, i, text in items:
        draw.rectangle([x, y, x + box, y + box], fill=tuple(int(v) for v in palette[i]), outline="black")
        draw.text((x + box + 6, y), text, fill="black", font=font)
    return strip


def contact_sheet(rows: Sequence[Sequence[np.ndarray | None]], columns: Sequence[str], labels: Sequence[str],
                  class_names: Sequence[str], out: str | Path, title: str = "", tile: int = 160) -> Path:
    """A grid of tiles (``rows`` of arrays, ``None`` = empty) under column titles, each row with a
    label on its left, a class legend at the bottom; written as PNG to ``out``."""
    font, small = _font(16), _font(13)
    label_w = max([int(small.getlength(line)) for t in labels for line in t.split("\n")] + [60]) + 16
    gap, head = 6, 26 + (24 if title else 0)
    width = label_w + len(columns) * (tile + gap) + gap
    body = head + len(rows) * (tile + gap) + gap
    palette = class_palette(len(class_names))
    key = legend(class_names, palette, width)
    sheet = Image.new("RGB", (width, body + key.height), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, 4), title, fill="black", font=font)
    for j, name in enumerate(columns):
        draw.text((label_w + j * (tile + gap) + gap, head - 22), name, fill="black", font=font)
    for i, (row, label) in enumerate(zip(rows, labels)):
        y = head + i * (tile + gap) + gap
        for k, line in enumerate(label.split("\n")):
            draw.text((6, y + 4 + 16 * k), line, fill="black", font=small)
        for j, array in enumerate(row):
            if array is not None:
                sheet.paste(_tile(array, tile), (label_w + j * (tile + gap) + gap, y))
    sheet.paste(key, (0, body))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


SHEET = "contact_sheet.png"


def pair_folder_sheet(pairs: str | Path | Pairs, out: str | Path | None = None, limit: int = 12,
                      style_images: dict[int, np.ndarray] | None = None, notes: dict[int, str] | None = None) -> Path:
    """The picture of a pair folder (or of pairs read from it already): per pair the image, its
    mask in the class palette, both overlaid, and (when given, e.g. by ``python -m stedm.qc``)
    its style source; legend from the folder's settings (``class_names`` / ``layout_classes``).
    ``seg_*.png`` stay grey class ids."""
    from stedm.data.pair_folder import Pairs, read_pairs

    pairs = pairs.first(limit) if isinstance(pairs, Pairs) else read_pairs(pairs, limit)
    if not pairs.indices:
        raise ValueError(f"{pairs.folder}: no img_XXXXX.png/seg_XXXXX.png pairs to show")
    n = pairs.layout_classes
    names = list(pairs.settings.get("class_names") or [f"class {c}" for c in range(n)])[:n]
    names += [f"class {c}" for c in range(len(names), n)]
    palette = class_palette(n)
    columns = ["image", "mask", "overlay"] + (["style source"] if style_images else [])
    rows, labels = [], []
    for i in pairs.indices:
        image, mask = pairs.images[i], pairs.masks[i]
        row = [image, colour_mask(mask, palette), overlay(image, mask, palette)]
        if style_images:
            row.append(style_images.get(i))
        rows.append(row)
        record = pairs.manifest.get(i, {})
        label = f"pair {i}\nlayout {record.get('layout_case', '?')}\nstyle {record.get('style_case', '?')}"
        labels.append(label + (f"\n{notes[i]}" if notes and i in notes else ""))
    return contact_sheet(rows, columns, labels, names, pairs.folder / SHEET if out is None else out,
                         title=f"{len(pairs.indices)} of {len(pairs.manifest) or len(pairs.indices)} pairs, "
                               f"layout in {n} classes")
