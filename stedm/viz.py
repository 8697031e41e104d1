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

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
