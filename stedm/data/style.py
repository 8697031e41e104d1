"""Style samplers: which images the style encoder sees for a training sample (SPEC §1).

Interface: a sampler is called as ``sampler(dataset, record, image, rng)`` with the dataset the
sample comes from, its loaded :class:`~stedm.data.base.Record` (``record.meta`` carries e.g. a
slide location), the target image *after* augmentation (uint8 H x W x 3) and a numpy
``Generator``; it returns ``num_images`` uint8 images of the target's size. ``requires`` names
dataset capabilities the sampler needs (slide samplers need ``"slide"``), checked before
training starts by :func:`check_compatible`.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np


class StyleSampler:
    """Base class; ``num_images = 0`` means no style key in the sample."""

    name = "base"
    num_images = 1
    requires: frozenset[str] = frozenset()

    def __call__(self, dataset: Any, record: Any, image: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError


class NoStyle(StyleSampler):
    """``none``: no style images; the model uses its null (zero) style vector."""

    name = "none"
    num_images = 0

    def __call__(self, dataset, record, image, rng):
        return []


class AugmentedStyle(StyleSampler):
    """``augmented``: the target image itself, strongly augmented (for natural images)."""

    name = "augmented"

    def __init__(self, scale=(0.8, 1.2), translate: float = 0.1, rotate: float = 360.0, shear: float = 20.0) -> None:
        self.transform = A.Compose([
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(
                scale=tuple(scale),
                translate_percent=(-translate, translate),
                rotate=(-rotate, rotate),
                shear=(-shear, shear),
                border_mode=cv2.BORDER_REFLECT_101,
                p=1.0,
            ),
        ])

    def __call__(self, dataset, record, image, rng):
        self.transform.set_random_seed(int(rng.integers(0, 2**31)))
        return [self.transform(image=image)["image"]]


def check_compatible(sampler: StyleSampler, dataset: Any, entry: str) -> None:
    """Refuse a sampler whose needs the dataset cannot meet, naming both and the fix."""
    missing = set(sampler.requires) - set(getattr(dataset, "capabilities", ()))
    if missing:
        raise ValueError(
            f"style_sampling={sampler.name} needs a dataset with {sorted(missing)} "
            f"(whole-slide data), but entry '{entry}' ({type(dataset).__name__}) has none; "
            "choose style_sampling=none or augmented for this data")
