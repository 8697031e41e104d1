"""Where training patches come from: class groups with probabilities, uniform points in a map.

A training location is drawn in three steps (docs/method.md, 3 Data): a class *group* by its
probability (e.g. CATCH background 0.4 / tumour 0.5 / unannotated white 0.1), a slide uniformly
among the slides that contain the group, and a point uniformly inside the group's area on that
slide's low-resolution lookup map. The groups are ``data.locations`` (the ``locations`` of a
whole-slide dataset entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from stedm.data.contract import IGNORE_INDEX

UNANNOTATED = "unannotated"
"""``classes`` value of a group made of the pixels no annotation covers."""


@dataclass(frozen=True)
class ClassGroup:
    name: str
    probability: float
    values: tuple[int, ...]  # lookup-map values: class ids, or IGNORE_INDEX for unannotated pixels


def parse_groups(locations: Mapping[str, Any] | None, num_classes: int | None, where: str) -> list[ClassGroup]:
    """``{name: {probability: p, classes: [ids] | "unannotated"}}`` -> groups (``None``: all classes, p = 1)."""
    if not locations:
        if num_classes is None:
            raise ValueError(f"{where}: give data.num_classes or a locations table")
        return [ClassGroup("annotated", 1.0, tuple(range(num_classes)))]
    groups = []
    for name, spec in locations.items():
        if not isinstance(spec, Mapping) or set(spec) != {"probability", "classes"}:
            raise ValueError(f"{where}: locations.{name} must be {{probability: p, classes: [ids] or "
                             f"'{UNANNOTATED}'}}, got {spec}")
        probability = float(spec["probability"])
        if probability < 0:
            raise ValueError(f"{where}: locations.{name}.probability must be >= 0, got {probability}")
        classes = spec["classes"]
        if classes == UNANNOTATED:
            values = (IGNORE_INDEX,)
        else:
            values = tuple(int(c) for c in classes)
            bad = [c for c in values if num_classes is not None and not 0 <= c < num_classes]
            if not values or bad:
                raise ValueError(f"{where}: locations.{name}.classes must be class ids in 0..{num_classes - 1} "
                                 f"or '{UNANNOTATED}', got {classes}")
        groups.append(ClassGroup(str(name), probability, values))
    if sum(g.probability for g in groups) <= 0:
        raise ValueError(f"{where}: the locations probabilities sum to 0")
    return groups


class MapPoints:
    """Uniform level-0 points over the pixels of a low-resolution map whose value is in ``values``.

    Map pixel ``(i, j)`` covers level-0 ``[j d, (j + 1) d) x [i d, (i + 1) d)``. Only a running
    count per row is stored besides the (shared) map: a draw picks a rank among the selected
    pixels, finds its row by binary search and its column with one row scan, then jitters
    uniformly inside the pixel.
    """

    def __init__(self, labels: np.ndarray, values: Sequence[int], downsample: float) -> None:
        self.labels = labels
        self.values = np.asarray(sorted(values), dtype=labels.dtype)
        self.downsample = float(downsample)
        per_row = np.isin(labels, self.values).sum(axis=1)
        self.cumulative = np.concatenate([[0], np.cumsum(per_row)])

    @property
    def count(self) -> int:
        return int(self.cumulative[-1])

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n x 2`` level-0 ``(x, y)`` points; the map must select at least one pixel."""
        if self.count == 0:
            raise ValueError("no pixel of the map is selected")
        ranks = rng.integers(self.count, size=n)
        rows = np.searchsorted(self.cumulative, ranks, side="right") - 1
        cols = np.array([np.flatnonzero(np.isin(self.labels[r], self.values))[k - self.cumulative[r]]
                         for r, k in zip(rows, ranks)], dtype=np.float64)
        jitter = rng.random((n, 2))
        return np.stack([(cols + jitter[:, 0]) * self.downsample, (rows + jitter[:, 1]) * self.downsample], axis=1)
