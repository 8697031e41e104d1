"""GlaS (MICCAI 2015 gland segmentation challenge), official layout, 2 classes (background, gland)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stedm.data.io import read_image, read_mask
from stedm.data.datasets.official_split import ImageItem, OfficialSplitDataset, natural_key, pair_by_stem

GLAS_LAYOUT = ("<root>/train_1.bmp + <root>/train_1_anno.bmp, ..., testA_*.bmp + testA_*_anno.bmp, "
               "testB_*.bmp + testB_*_anno.bmp (the unpacked 'Warwick QU Dataset (Released 2016_07_08)' folder; "
               "Grade.csv may lie beside them and is not needed)")
_IMAGE_NAME = re.compile(r"^(train|testA|testB)_\d+$")


class GlasDataset(OfficialSplitDataset):
    """GlaS in its official layout (all images and ``*_anno.bmp`` instance maps in one folder).

    Roles and splits follow :mod:`stedm.data.datasets.official_split`: ``test`` = ``test_parts``
    (default testA + testB), ``train``/``val`` come from the 85 official training images. The
    sample mask is ``instances > 0``; ``instances`` (the annotation's gland ids) are kept; the
    case id is the image name (e.g. ``testA_12``).
    """

    layout = GLAS_LAYOUT

    def __init__(
        self,
        root: str | Path,
        role: str = "labelled",
        split: str = "train",
        class_train_samples: int | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        test_parts: Sequence[str] = ("testA", "testB"),
        name: str = "glas",
        num_classes: int | None = 2,
        transform: Callable | None = None,
        style_source: Any | None = None,
    ) -> None:
        self.root = Path(root)
        bad_parts = set(test_parts) - {"testA", "testB"}
        if bad_parts or not test_parts:
            raise ValueError(f"test_parts must be a non-empty subset of ('testA', 'testB'), got {list(test_parts)}")
        self.test_parts = tuple(test_parts)
        super().__init__(name, role, split, num_classes, transform, style_source,
                         class_train_samples, val_fraction, seed)

    def _find(self, parts: Sequence[str]) -> list[ImageItem]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"GlaS root '{self.root}' does not exist; expected {GLAS_LAYOUT}")
        files = [p for p in self.root.iterdir() if p.suffix.lower() == ".bmp" and p.stem.split("_")[0] in parts]
        images = [p for p in files if _IMAGE_NAME.match(p.stem)]
        annotations = [p for p in files if p.stem.endswith("_anno")]
        if not images:
            raise FileNotFoundError(f"no GlaS images {'/'.join(parts)}_*.bmp in '{self.root}'; expected {GLAS_LAYOUT}")
        items = pair_by_stem(images, annotations, lambda stem: f"{stem}_anno", f"GlaS root '{self.root}'")
        # testA before testB, each in natural order
        return sorted(items, key=lambda item: (parts.index(item.name.split("_")[0]), natural_key(item.name)))

    def find_train_items(self) -> list[ImageItem]:
        return self._find(("train",))

    def find_test_items(self) -> list[ImageItem]:
        return self._find(self.test_parts)

    def read_image(self, item: ImageItem) -> np.ndarray:
        return read_image(item.image_path)

    def read_instances(self, item: ImageItem, shape: tuple[int, int]) -> np.ndarray:
        return read_mask(item.annotation_path)
