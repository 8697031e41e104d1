"""Base of datasets shipped as an official train set and test set of whole annotated images (GlaS, MoNuSeg).

Roles and splits, the same for every such dataset (``seed`` fixes all random choices):

- ``val``: ``round(val_fraction * n_train)`` official training images, held out by image;
- labelled ``train``: ``class_train_samples`` images (``None`` = all) of the remaining training
  images. Both come from one seeded permutation of the training images, so with a fixed seed
  the labelled sets grow nested (the 10-image set is part of the 20-image set);
- ``test``: the official test images;
- unlabelled ``train``: every official training image that is not in the labelled set
  (validation images included: their labels are never used). For the SSL pretraining pool, set
  ``class_train_samples: 0`` to get the whole official training set, as the paper does.
  Unlabelled data exist only for ``split="train"``.

Every list is sorted by natural name order (``train_2`` before ``train_10``), independent of
the file system's listing order. Items are whole images; cropping happens in the DataModule.
Subclasses implement :meth:`find_train_items`, :meth:`find_test_items`, :meth:`read_image` and
:meth:`read_instances` (``H x W`` instance ids, 0 = background); the mask is ``instances > 0``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stedm.data.base import Record, SegmentationDataset, check_role


@dataclass(frozen=True)
class ImageItem:
    """One official image and its annotation file."""

    name: str
    image_path: Path
    annotation_path: Path


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically (``train_2`` < ``train_10``)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def select_split(train: list[Any], test: list[Any], role: str, split: str, class_train_samples: int | None,
                 val_fraction: float, seed: int) -> list[Any]:
    """The items of ``role``/``split`` by the rules of this module's docstring (lists already sorted)."""
    if split == "test":
        if role == "unlabelled":
            raise ValueError("unlabelled data exist only for split 'train'; use role 'labelled' for test")
        return list(test)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(train))
    num_val = round(val_fraction * len(train))
    pool = order[num_val:]
    if class_train_samples is not None and not 0 <= class_train_samples <= len(pool):
        raise ValueError(
            f"class_train_samples={class_train_samples}, but only {len(pool)} training images remain after "
            f"holding out {num_val} for validation (val_fraction={val_fraction}); choose 0..{len(pool)} or None")
    labelled = set(pool[:class_train_samples].tolist())
    if split == "val":
        if role == "unlabelled":
            raise ValueError("unlabelled data exist only for split 'train'; use role 'labelled' for val")
        chosen = set(order[:num_val].tolist())
    elif role == "labelled":
        chosen = labelled
    else:
        chosen = set(range(len(train))) - labelled
    return [train[i] for i in sorted(chosen)]


def pair_by_stem(images: list[Path], annotations: list[Path], annotation_stem: Callable[[str], str],
                 where: str) -> list[ImageItem]:
    """Pair every image with the annotation named ``annotation_stem(image stem)``; refuse any mismatch."""
    by_stem = {p.stem: p for p in annotations}
    expected = {annotation_stem(p.stem): p for p in images}
    no_annotation = sorted((p.name for s, p in expected.items() if s not in by_stem), key=natural_key)
    no_image = sorted((p.name for s, p in by_stem.items() if s not in expected), key=natural_key)
    if no_annotation or no_image:
        raise ValueError(
            f"{where}: images and annotations do not match; images without annotation: {no_annotation[:10]}"
            f"{'...' if len(no_annotation) > 10 else ''}, annotations without image: {no_image[:10]}"
            f"{'...' if len(no_image) > 10 else ''}")
    items = [ImageItem(p.stem, p, by_stem[s]) for s, p in expected.items()]
    return sorted(items, key=lambda item: natural_key(item.name))


class OfficialSplitDataset(SegmentationDataset):
    """Whole images with instance annotations, split by the rules of :mod:`stedm.data.datasets.official_split`."""

    layout = ""  # the expected on-disk layout, quoted in error messages

    def __init__(self, name: str, role: str, split: str, num_classes: int | None, transform: Callable | None,
                 style_source: Any | None, class_train_samples: int | None, val_fraction: float, seed: int) -> None:
        super().__init__(name=name, split=split, num_classes=num_classes, transform=transform,
                         style_source=style_source)
        check_role(role, f"dataset '{name}'")
        if num_classes is not None and num_classes != 2:
            raise ValueError(f"dataset '{name}' has 2 classes (background, foreground); got num_classes={num_classes}")
        self.role = role
        train = self.find_train_items() if split != "test" else []
        test = self.find_test_items() if split == "test" else []
        self.items = select_split(train, test, role, split, class_train_samples, val_fraction, seed)
        if not self.items:
            raise ValueError(f"dataset '{name}' ({role}, split '{split}') is empty; check class_train_samples, "
                             f"val_fraction and the data under the root ({self.layout})")

    # -- to implement -----------------------------------------------------------------------------
    def find_train_items(self) -> list[ImageItem]:  # pragma: no cover - abstract
        raise NotImplementedError

    def find_test_items(self) -> list[ImageItem]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_image(self, item: ImageItem) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_instances(self, item: ImageItem, shape: tuple[int, int]) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------
    @property
    def labelled(self) -> bool:
        return self.role == "labelled"

    def __len__(self) -> int:
        return len(self.items)

    def cases(self) -> list[str]:
        return [item.name for item in self.items]

    def files(self) -> list[Path]:
        return [p for item in self.items
                for p in ((item.image_path, item.annotation_path) if self.labelled else (item.image_path,))]

    def load(self, index: int) -> Record:
        item = self.items[index]
        image = self.read_image(item)
        if not self.labelled:
            return Record(image=image, mask=None, case=item.name)
        instances = self.read_instances(item, image.shape[:2])
        if instances.shape != image.shape[:2]:
            raise ValueError(f"{item.annotation_path}: annotation is {instances.shape}, image is {image.shape[:2]}")
        return Record(image=image, mask=(instances > 0).astype(np.uint8), case=item.name, instances=instances)
