"""Evaluation units of a whole slide: its annotated regions, cut into bounded rectangles.

The unit of evaluation is an annotated region read whole (the evaluator slides its window over
it). Regions are found on the lookup map: connected annotated areas, grown by one map pixel so
that boundary pixels a coarse map misses stay inside, give bounding boxes; boxes that overlap
are merged until none does, so the boxes are disjoint; a box larger than ``max_size`` pixels
per side is cut into near-equal tiles (memory stays bounded: a unit is at most
``max_size`` squared pixels plus its context margin). Tiles without annotation are dropped.
Because the resulting *cores* are disjoint and lie on one pixel grid, every annotated pixel
of the grown regions is scored exactly once (only slivers narrower than a map pixel that cover
no map pixel centre can escape; lower ``annotation_downsample`` for such annotations).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from stedm.data.contract import IGNORE_INDEX

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (end exclusive), pixels at the dataset downsample


def merge_overlapping(boxes: list[Box]) -> list[Box]:
    """Replace overlapping boxes by their union until all are disjoint."""
    changed = True
    while changed:
        changed, merged = False, []
        for box in boxes:
            for k, other in enumerate(merged):
                if box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]:
                    merged[k] = (min(box[0], other[0]), min(box[1], other[1]),
                                 max(box[2], other[2]), max(box[3], other[3]))
                    changed = True
                    break
            else:
                merged.append(box)
        boxes = merged
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def split_box(box: Box, max_size: int) -> list[Box]:
    """Near-equal tiles of at most ``max_size`` pixels per side that partition ``box``."""
    x0, y0, x1, y1 = box
    nx, ny = math.ceil((x1 - x0) / max_size), math.ceil((y1 - y0) / max_size)
    xs = [x0 + round(i * (x1 - x0) / nx) for i in range(nx + 1)]
    ys = [y0 + round(i * (y1 - y0) / ny) for i in range(ny + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(ny) for i in range(nx)]


def evaluation_cores(lookup: np.ndarray, map_downsample: float, downsample: float, max_size: int) -> list[Box]:
    """Disjoint boxes (pixels at ``downsample``, grid origin at level-0 (0, 0)) covering the annotations."""
    grown = cv2.dilate((lookup != IGNORE_INDEX).astype(np.uint8), np.ones((3, 3), np.uint8))
    _, _, stats, _ = cv2.connectedComponentsWithStats(grown, connectivity=8)
    scale = map_downsample / downsample  # output pixels per map pixel
    boxes = [(math.floor(x * scale), math.floor(y * scale), math.ceil((x + w) * scale), math.ceil((y + h) * scale))
             for x, y, w, h, _ in stats[1:]]
    cores = []
    for box in merge_overlapping(boxes):
        for x0, y0, x1, y1 in split_box(box, max_size):
            window = grown[math.floor(y0 / scale):math.ceil(y1 / scale), math.floor(x0 / scale):math.ceil(x1 / scale)]
            if window.any():
                cores.append((x0, y0, x1, y1))
    return cores
