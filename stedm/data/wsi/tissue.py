"""Tissue detection on a slide thumbnail: min over RGB, blurred, thresholded, cleaned.

The ``mp`` and ``nearby`` style sources and the unlabelled pool draw their patches on tissue
(docs/method.md, 1 STEDM).

Stained tissue has at least one dark channel while glass is bright in all three, so the
per-pixel minimum over RGB separates them; blurring removes speckle before the threshold, a
morphological closing then opening fills small gaps and drops isolated specks, and connected
components smaller than ``min_area`` thumbnail pixels are removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class TissueParams:
    """``downsample``: thumbnail resolution (level-0 px per thumbnail px); ``threshold``: a pixel
    is tissue when its blurred RGB minimum is below it (``None``: Otsu's threshold per slide);
    ``blur_sigma``: Gaussian sigma in thumbnail px; ``kernel``: diameter of the morphological
    disk; ``min_area``: smallest kept component in thumbnail px."""

    downsample: float = 32.0
    threshold: int | None = 220
    blur_sigma: float = 2.0
    kernel: int = 5
    min_area: int = 16


def detect_tissue(thumbnail: np.ndarray, params: TissueParams) -> np.ndarray:
    """Boolean ``H x W`` tissue mask of an RGB uint8 thumbnail."""
    darkest = thumbnail[..., :3].min(axis=2)
    if params.blur_sigma > 0:
        darkest = cv2.GaussianBlur(darkest, (0, 0), params.blur_sigma)
    if params.threshold is None:
        _, mask = cv2.threshold(darkest, 0, 1, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    else:
        mask = (darkest < params.threshold).astype(np.uint8)
    if params.kernel > 1:
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (params.kernel, params.kernel))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, disk)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, disk)
    if params.min_area > 1:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= params.min_area)
        mask = np.isin(labels, keep[keep > 0]).astype(np.uint8)
    return mask.astype(bool)
