"""Style sources: which images the style encoder sees for a training sample (docs/method.md, 1 STEDM),
chosen by the ``style_sampling`` config group (its ``source`` key).

Interface: a source is called as ``source(dataset, record, image, rng)`` with the dataset the
sample comes from, its loaded :class:`~stedm.data.base.Record` (``record.meta`` carries e.g. a
slide location), the target image *after* augmentation (uint8 H x W x 3) and a numpy
``Generator``; it returns ``num_images`` uint8 images of the target's size. ``requires`` names
dataset capabilities the source needs (slide sources need ``"slide"``), checked before
training starts by :func:`check_compatible`.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

from stedm.data.transforms import seed_transform


class StyleSource:
    """Base class; ``num_images = 0`` means no style key in the sample."""

    name = "base"
    num_images = 1
    requires: frozenset[str] = frozenset()

    def __call__(self, dataset: Any, record: Any, image: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError


class NoStyle(StyleSource):
    """``none``: no style images; the model uses its null (zero) style vector."""

    name = "none"
    num_images = 0

    def __call__(self, dataset, record, image, rng):
        return []


class AugmentedStyle(StyleSource):
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
        seed_transform(self.transform, int(rng.integers(0, 2**31)))
        return [self.transform(image=image)["image"]]


def check_compatible(source: StyleSource, dataset: Any, entry: str) -> None:
    """Refuse a source whose needs the dataset cannot meet, naming both and the fix."""
    missing = set(source.requires) - set(getattr(dataset, "capabilities", ()))
    if missing:
        raise ValueError(
            f"style_sampling={source.name} needs a dataset with {sorted(missing)} "
            f"(whole-slide data), but entry '{entry}' ({type(dataset).__name__}) has none; "
            "choose style_sampling=none or augmented for this data")


class NearbyStyle(StyleSource):
    """``nearby``: one patch of the target's slide, centred within ``relative_dist`` patch
    extents (level-0 ``patch_size x downsample``) of the target's centre, uniformly per axis,
    and on tissue. Of ``tries`` candidate centres the first on tissue is read; when none is,
    the target's own location is."""

    name = "nearby"
    requires = frozenset({"slide"})

    def __init__(self, relative_dist: float = 1.0, tries: int = 16) -> None:
        if relative_dist < 0 or tries < 1:
            raise ValueError(f"nearby style: need relative_dist >= 0 and tries >= 1, got {relative_dist}, {tries}")
        self.relative_dist, self.tries = float(relative_dist), int(tries)

    def __call__(self, dataset, record, image, rng):
        centre = np.array([record.meta["centre_x"], record.meta["centre_y"]], dtype=np.float64)
        radius = self.relative_dist * dataset.patch_extent
        candidates = centre + rng.uniform(-radius, radius, size=(self.tries, 2))
        on_tissue = dataset.on_tissue(record.meta["slide_index"], candidates)
        chosen = candidates[int(np.argmax(on_tissue))] if on_tissue.any() else centre
        return dataset.read_style_patches(record, chosen[None])


class MultiPatchStyle(StyleSource):
    """``mp``: ``num_patches`` patches from uniformly random tissue locations of the target's
    own slide (the original indexed another slide's tissue mask)."""

    name = "mp"
    requires = frozenset({"slide"})

    def __init__(self, num_patches: int = 10) -> None:
        if num_patches < 1:
            raise ValueError(f"mp style: num_patches must be >= 1, got {num_patches}")
        self.num_images = int(num_patches)

    def __call__(self, dataset, record, image, rng):
        slide = record.meta["slide_index"]
        return dataset.read_style_patches(record, dataset.tissue_points(slide, self.num_images, rng))
