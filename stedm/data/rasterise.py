"""Exact polygon rasterisation: a pixel is inside a polygon when its *centre* is.

The one rasteriser of annotation polygons: whole-slide annotations (level-0 coordinates,
:mod:`stedm.data.wsi.annotations`) and MoNuSeg's nuclei (image coordinates, origin 0,
downsample 1, :mod:`stedm.data.datasets.monuseg`). A raster with origin ``(x0, y0)`` and downsample
``d`` has pixel ``(i, j)`` centred at ``(x0 + (j + 0.5) d, y0 + (i + 0.5) d)``. At origin 0 and
downsample 1, pixel ``(i, j)`` is the unit square from ``(j, i)`` to ``(j + 1, i + 1)`` (the
GeoJSON/QuPath convention): a square from ``(0, 0)`` to ``(2, 2)`` covers exactly pixels 0..1 x
0..1. A polygon is a list of rings (exterior first, then holes) of ``(x, y)`` vertices; the
even-odd rule over all its rings leaves holes empty whatever their orientation. Centres lying
exactly on an edge follow the half-open rule (inside on a left/top edge, outside on a
right/bottom edge), so polygons that share an edge never both claim a pixel.

Scanline fill: every edge crosses each pixel row whose centre it spans once; a crossing toggles
the parity of all pixels to its right. Crossings are accumulated with ``np.add.at`` and a
cumulative sum along the row, so the cost grows with the polygon's height in rows and the
number of edges, not with its area times its vertex count (as point-in-polygon tests do).
Several polygons are painted one after another, later ones over earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from stedm.data.contract import IGNORE_INDEX


@dataclass(frozen=True)
class Polygon:
    """One annotated polygon: its label (class or instance id), edges ``E x 4`` (x1, y1, x2, y2), bounding box, area."""

    label: int
    edges: np.ndarray
    bbox: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max
    area: float  # exterior minus holes

    @classmethod
    def from_rings(cls, label: int, rings: Sequence[np.ndarray]) -> "Polygon":
        rings = [r for r in map(open_ring, rings) if len(r) >= 3]
        if not rings:
            raise ValueError("a polygon needs a ring of at least 3 vertices")
        edges = np.concatenate([np.concatenate([r, np.roll(r, -1, axis=0)], axis=1) for r in rings])
        lo, hi = rings[0].min(axis=0), rings[0].max(axis=0)
        area = abs(ring_area(rings[0])) - sum(abs(ring_area(r)) for r in rings[1:])
        return cls(int(label), edges[edges[:, 1] != edges[:, 3]], (lo[0], lo[1], hi[0], hi[1]), float(area))


def open_ring(ring: np.ndarray) -> np.ndarray:
    """A ring's ``N x 2`` float vertices without the closing repeat of the first one."""
    ring = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    return ring[:-1] if len(ring) > 1 and np.array_equal(ring[0], ring[-1]) else ring


def ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of a ring of vertices."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def fill_edges(edges: np.ndarray, x0: float, y0: float, downsample: float, height: int, width: int) -> np.ndarray:
    """Boolean ``height x width`` raster of the even-odd interior of ``edges`` (see module doc)."""
    inside = np.zeros((height, width + 1), dtype=np.uint8)
    if len(edges) == 0 or height <= 0 or width <= 0:
        return inside[:, :width].astype(bool)
    x1, y1, x2, y2 = edges.T
    # Row i (centre y0 + (i + 0.5) d) is crossed when min(y) <= centre < max(y).
    first = np.maximum(np.ceil((np.minimum(y1, y2) - y0) / downsample - 0.5), 0).astype(np.int64)
    last = np.minimum(np.ceil((np.maximum(y1, y2) - y0) / downsample - 0.5) - 1, height - 1).astype(np.int64)
    # Edges wholly right of the last pixel centre toggle nothing.
    right_of_all = np.minimum(x1, x2) > x0 + (width - 0.5) * downsample
    counts = np.where(right_of_all, 0, last - first + 1).clip(min=0)
    total = int(counts.sum())
    if total == 0:
        return inside[:, :width].astype(bool)
    edge = np.repeat(np.arange(len(edges)), counts)
    rows = first[edge] + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    # Crossings are computed in level-0 coordinates, so every window agrees on them exactly.
    centre_y = y0 + (rows + 0.5) * downsample
    x = x1[edge] + (centre_y - y1[edge]) * (x2[edge] - x1[edge]) / (y2[edge] - y1[edge])
    cols = np.clip(np.ceil((x - x0) / downsample - 0.5), 0, width).astype(np.int64)  # first centre at or right of x
    np.add.at(inside, (rows, cols), 1)  # uint8 wraps mod 256: parity survives
    return (np.cumsum(inside, axis=1, dtype=np.uint8)[:, :width] & 1).astype(bool)


def rasterise_polygons(polygons: Sequence[Polygon], x0: float, y0: float, downsample: float, height: int,
                       width: int, fill: int = IGNORE_INDEX, dtype: type = np.uint8) -> np.ndarray:
    """``height x width`` labels of ``polygons`` painted in order (a later one over an earlier one);
    ``fill`` elsewhere. ``dtype``: uint8 for class ids, a wider integer for instance ids."""
    out = np.full((height, width), fill, dtype=dtype)
    for polygon in polygons:
        bx0, by0, bx1, by1 = polygon.bbox
        # Only the pixels whose centres fall in the bounding box can be inside.
        j0 = max(int(np.ceil((bx0 - x0) / downsample - 0.5)), 0)
        j1 = min(int(np.floor((bx1 - x0) / downsample - 0.5)) + 1, width)
        i0 = max(int(np.ceil((by0 - y0) / downsample - 0.5)), 0)
        i1 = min(int(np.floor((by1 - y0) / downsample - 0.5)) + 1, height)
        if j0 >= j1 or i0 >= i1:
            continue
        inside = fill_edges(polygon.edges, x0 + j0 * downsample, y0 + i0 * downsample, downsample, i1 - i0, j1 - j0)
        out[i0:i1, j0:j1][inside] = polygon.label
    return out
