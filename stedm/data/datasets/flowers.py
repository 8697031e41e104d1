"""Oxford-102 flowers in the official on-disk format (docs/method.md, 3 Data).

``root/imgs/image_%05d.jpg``, ``root/segs/segmim_%05d.jpg`` (background pure blue),
``root/imagelabels.mat`` (``labels``: 1-based class per image) and ``root/setid.mat``
(``trnid``, ``valid``, ``tstid``: 1-based image ids). Class ids in the config are 0-based.

- labelled, train: the first ``class_train_samples`` images (by id) of the official training
  split of each class in ``train_classes``;
- labelled, val / test: the official ``valid`` / ``tstid`` splits, all classes;
- unlabelled (the style pool): every other official *training* image (``trnid``) of the train
  classes plus the training images of the ``unanno_classes`` (the original built this pool from
  the wrong list). ``valid`` and ``tstid`` images are never in it: synthetic training pairs
  would carry the appearance of evaluation images (the paper says "all images of the unanno
  classes"; docs/method.md, 5 Deviations).
Each image is its own case. Masks: 0 = background (R<=10, G<=10, B>=220), 1 = flower.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from stedm.data.base import Record, SegmentationDataset, check_role
from stedm.data.io import read_image, require_dir


def load_mat(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    if not path.is_file():
        raise FileNotFoundError(f"Oxford-102 file missing: {path}")
    content = loadmat(path)
    if key not in content:
        raise ValueError(f"{path} has no '{key}' array")
    return np.asarray(content[key]).ravel().astype(np.int64)


def flower_mask(segmentation: np.ndarray) -> np.ndarray:
    """Oxford-102 segmentation image -> 0 (pure blue background) / 1 (flower)."""
    r, g, b = segmentation[..., 0], segmentation[..., 1], segmentation[..., 2]
    background = (r <= 10) & (g <= 10) & (b >= 220)
    return (~background).astype(np.int64)


class FlowersDataset(SegmentationDataset):
    def __init__(self, name: str, root: str, train_classes: Sequence[int], unanno_classes: Sequence[int],
                 role: str = "labelled", split: str = "train", class_train_samples: int | None = None,
                 **kwargs) -> None:
        super().__init__(name=name, split=split, **kwargs)
        self.role = check_role(role, f"dataset '{name}'")
        self.root = require_dir(root, "Oxford-102", f"data.dataset.{name}.root (or location.data_dir)")
        require_dir(self.root / "imgs", "Oxford-102 images", f"data.dataset.{name}.root")
        labels = load_mat(self.root / "imagelabels.mat", "labels") - 1  # 0-based classes
        setid = {key: load_mat(self.root / "setid.mat", key) for key in ("trnid", "valid", "tstid")}
        overlap = set(train_classes) & set(unanno_classes)
        if overlap:
            raise ValueError(f"dataset '{name}': classes {sorted(overlap)} are both in train_classes and unanno_classes")
        train_classes = set(int(c) for c in train_classes)
        per_class = defaultdict(list)
        for image_id in sorted(setid["trnid"].tolist()):
            per_class[int(labels[image_id - 1])].append(image_id)
        k = class_train_samples
        labelled = {i for c in train_classes for i in (per_class[c] if k is None else per_class[c][:k])}
        if role == "unlabelled":
            pool = set(int(c) for c in unanno_classes) | train_classes
            train_ids = sorted(set(setid["trnid"].tolist()))
            self.ids = [i for i in train_ids if int(labels[i - 1]) in pool and i not in labelled]
        elif split == "train":
            self.ids = sorted(labelled)
        else:
            self.ids = sorted(setid["valid" if split == "val" else "tstid"].tolist())
        if not self.ids:
            raise ValueError(f"dataset '{name}': no {role} images for split '{split}' "
                             "(check train_classes and class_train_samples)")
        self.labels = labels

    @property
    def labelled(self) -> bool:
        return self.role == "labelled"

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Record:
        image_id = self.ids[index]
        image = read_image(self.root / "imgs" / f"image_{image_id:05d}.jpg")
        mask = None
        if self.labelled:
            segmentation = read_image(self.root / "segs" / f"segmim_{image_id:05d}.jpg")
            if segmentation.shape != image.shape:
                raise ValueError(f"segmim_{image_id:05d}.jpg is {segmentation.shape[:2]}, "
                                 f"image_{image_id:05d}.jpg is {image.shape[:2]}")
            mask = flower_mask(segmentation)
        return Record(image=image, mask=mask, case=f"image_{image_id:05d}",
                      meta={"class_id": int(self.labels[image_id - 1])})

    def cases(self) -> list[str]:
        return [f"image_{i:05d}" for i in self.ids]

    def files(self) -> list[Path]:
        images = [self.root / "imgs" / f"image_{i:05d}.jpg" for i in self.ids]
        return images + ([self.root / "segs" / f"segmim_{i:05d}.jpg" for i in self.ids] if self.labelled else [])
