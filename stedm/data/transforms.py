"""Albumentations pipelines; image and mask (and instance map) are always transformed together."""

from __future__ import annotations

import albumentations as A
import cv2


def train_transform(patch_size: int, flips: bool = True, rotate90: bool = True, color_jitter: float = 0.0,
                    blur: float = 0.0) -> A.Compose:
    """Random ``patch_size`` crop (reflect-padded when the image is smaller) + light augmentation.

    ``color_jitter`` and ``blur`` are probabilities of image-only photometric changes
    (GenSelfDiff's fine-tuning uses both); masks only see the geometric ones.
    """
    steps = [
        A.PadIfNeeded(min_height=patch_size, min_width=patch_size, border_mode=cv2.BORDER_REFLECT_101),
        A.RandomCrop(height=patch_size, width=patch_size),
    ]
    if flips:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if rotate90:
        steps.append(A.RandomRotate90(p=0.5))
    if color_jitter > 0:
        steps.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=color_jitter))
    if blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=blur))
    return A.Compose(steps)
