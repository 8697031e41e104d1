"""Bring your own data: a folder of images, optionally a folder of masks and a CSV.

Layout::

    images_dir/    a.png b.tif c.jpg ...      (RGB or grey, 8 or 16 bit; any of png/jpg/tif/bmp)
    masks_dir/     a.png b.png c.png ...      (same file stem; class ids, or colours + palette)
    instances_dir/ a.png b.png c.png ...      (optional; same stems; instance ids, 0 = background)
    cases.csv      image,case,split           (optional; every column but image optional)

``cases.csv`` beside ``images_dir`` and ``instances/`` beside ``masks_dir`` are used when present
(the log says so); ``csv_path`` / ``instances_dir`` name other files, ``false`` ignores them.
Instance maps are what AJI and object Dice compare against; without them the ground-truth
objects are the connected components of the masks. Pixels of more than 8 bits are scaled to
0..255 by ``intensity_range=[lo, hi]`` (``data.intensity_range``), else by their bit depth.
Training images smaller than ``patch_size`` are mirror-padded to it, with a warning; one less
than ``MIN_PATCH_FRACTION`` of it on a side is refused.

``case`` groups images of one patient / slide (per-case metrics, and labelled/unlabelled
and train/val/test splits never cut a case). ``split`` is ``train``, ``val`` or ``test``;
without it cases are split with ``val_fraction`` / ``test_fraction``, sorted and seeded.
``class_train_samples`` = number of labelled training cases; the remaining training cases
are the unlabelled pool (``role="unlabelled"``). A folder without masks works as an
unlabelled source.
"""

from __future__ import annotations

import csv
import logging
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from stedm.data.base import SPLITS, Record, SegmentationDataset, check_mask_values, check_role
from stedm.data.io import find_with_stem, image_size, list_images, read_image, read_mask, require_dir

log = logging.getLogger(__name__)
MIN_PATCH_FRACTION = 0.5  # a training image below this fraction of patch_size on a side is refused


def assign_splits(cases: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Case -> split, by a seeded permutation of the sorted unique cases."""
    unique = sorted(set(cases))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    n_test = int(round(len(unique) * test_fraction))
    n_val = int(round(len(unique) * val_fraction))
    return {c: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, c in enumerate(order)}


def split_labelled(train_cases: Sequence[str], k: int | None, seed: int) -> set[str]:
    """The ``k`` labelled training cases (all when ``k`` is None), sorted then seeded."""
    unique = sorted(set(train_cases))
    if k is None:
        return set(unique)
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i] for i in order[:k]}


class FolderDataset(SegmentationDataset):
    def __init__(self, name: str, images_dir: str, masks_dir: str | None = None,
                 csv_path: str | bool | None = None, instances_dir: str | bool | None = None,
                 role: str = "labelled", split: str = "train", class_train_samples: int | None = None,
                 palette: Mapping[int, Sequence[int]] | None = None, intensity_range: Sequence[float] | None = None,
                 patch_size: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 seed: int = 0, verify: bool = True, **kwargs) -> None:
        super().__init__(name=name, split=split, **kwargs)
        self.role = check_role(role, f"dataset '{name}'")
        self.palette = {int(k): tuple(v) for k, v in palette.items()} if palette else None
        self.intensity_range = check_intensity_range(intensity_range, name)
        images = require_dir(images_dir, "images", f"data.dataset.{name}.images_dir")
        files = list_images(images)
        if not files:
            raise ValueError(f"dataset '{name}': no images (png/jpg/tif/bmp) in {images}")
        csv_path = beside(csv_path, images.parent / "cases.csv", f"data.dataset.{name}.csv_path", name)
        case_of, split_of = self._read_csv(csv_path, files) if csv_path else ({}, {})
        cases = [case_of.get(f.stem, f.stem) for f in files]
        if not split_of:
            by_case = assign_splits(cases, val_fraction, test_fraction, seed)
            split_of = {f.stem: by_case[c] for f, c in zip(files, cases)}
        labelled_cases = split_labelled([c for f, c in zip(files, cases) if split_of[f.stem] == "train"],
                                        class_train_samples, seed)
        keep = []
        for f, c in zip(files, cases):
            s = split_of[f.stem]
            if role == "unlabelled":
                if s == "train" and (c not in labelled_cases or masks_dir is None):
                    keep.append((f, c))
            elif s == split and (s != "train" or c in labelled_cases):
                keep.append((f, c))
        if not keep:
            raise ValueError(f"dataset '{name}': no {role} images for split '{split}' in {images} "
                             "(check the CSV's split column, class_train_samples and the fractions)")
        self.items = keep
        if split == "train" and patch_size is not None:
            check_patch_size(name, [f for f, _ in keep], int(patch_size))
        self.masks_dir = None
        self.instance_files: list[Path] | None = None
        if role == "labelled":
            if masks_dir is None:
                raise ValueError(f"dataset '{name}': role=labelled needs data.dataset.{name}.masks_dir")
            self.masks_dir = require_dir(masks_dir, "masks", f"data.dataset.{name}.masks_dir")
            self.mask_files = []
            for f, _ in self.items:
                m = find_with_stem(self.masks_dir, f.stem)
                if m is None:
                    raise FileNotFoundError(f"dataset '{name}': no mask for image {f.name} in {self.masks_dir} "
                                            "(masks must share the image's file stem)")
                self.mask_files.append(m)
            instances = beside(instances_dir, self.masks_dir.parent / "instances",
                               f"data.dataset.{name}.instances_dir", name, folder=True)
            if instances is not None:
                instances = require_dir(instances, "instance masks", f"data.dataset.{name}.instances_dir")
                self.instance_files = []
                for f, _ in self.items:
                    m = find_with_stem(instances, f.stem)
                    if m is None:
                        raise FileNotFoundError(
                            f"dataset '{name}': no instance mask for image {f.name} in {instances} (instance masks "
                            f"share the image's file stem; data.dataset.{name}.instances_dir=false ignores the folder)")
                    self.instance_files.append(m)
            if verify:
                self._verify()

    def _read_csv(self, csv_path: str, files: list[Path]) -> tuple[dict[str, str], dict[str, str]]:
        path = Path(csv_path)
        if not path.is_file():
            raise FileNotFoundError(f"dataset '{self.name}': CSV not found: {path} (data.dataset.{self.name}.csv_path)")
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "image" not in rows[0]:
            raise ValueError(f"{path}: needs a header with an 'image' column (and optionally case, split)")
        stems = {f.stem for f in files}
        case_of, split_of = {}, {}
        for row in rows:
            stem = Path(row["image"]).stem
            if stem not in stems:
                raise ValueError(f"{path}: image '{row['image']}' is not in the images folder")
            if row.get("case"):
                case_of[stem] = row["case"]
            if row.get("split"):
                if row["split"] not in SPLITS:
                    raise ValueError(f"{path}: split '{row['split']}' of '{row['image']}' must be one of {SPLITS}")
                split_of[stem] = row["split"]
        if split_of and len(split_of) != len(files):
            missing = sorted(stems - set(split_of))[:5]
            raise ValueError(f"{path}: the split column is missing for images {missing}")
        return case_of, split_of

    def _verify(self) -> None:
        """Read every mask once: sizes match the images and class ids are in range."""
        for (f, _), m in zip(self.items, self.mask_files):
            mask = read_mask(m, self.palette)
            if mask.shape != image_size(f):
                raise ValueError(f"mask {m} is {mask.shape[1]}x{mask.shape[0]} but image {f} is "
                                 f"{image_size(f)[1]}x{image_size(f)[0]} (width x height)")
            check_mask_values(mask, self.num_classes, str(m))
        for (f, _), m in zip(self.items, self.instance_files or []):
            if image_size(m) != image_size(f):
                raise ValueError(f"instance mask {m} is {image_size(m)[1]}x{image_size(m)[0]} but image {f} is "
                                 f"{image_size(f)[1]}x{image_size(f)[0]} (width x height)")

    @property
    def labelled(self) -> bool:
        return self.role == "labelled"

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Record:
        path, case = self.items[index]
        image = read_image(path, self.intensity_range)
        mask = read_mask(self.mask_files[index], self.palette) if self.labelled else None
        instances = read_mask(self.instance_files[index]) if self.instance_files is not None else None
        return Record(image=image, mask=mask, case=case, instances=instances, meta={"path": str(path)})

    def cases(self) -> list[str]:
        return [case for _, case in self.items]

    def files(self) -> list[Path]:
        return [f for f, _ in self.items] + (list(self.mask_files) if self.labelled else []) + \
            list(self.instance_files or [])

    def read_file(self, path: Path) -> None:
        """Each file with the reader :meth:`load` uses (images with ``intensity_range``, masks
        with the palette, instance maps as ids)."""
        if self.labelled and path in self._mask_set:
            read_mask(path, self.palette)
        elif path in self._instance_set:
            read_mask(path)
        else:
            read_image(path, self.intensity_range)

    @cached_property
    def _mask_set(self) -> set[Path]:
        return set(self.mask_files)

    @cached_property
    def _instance_set(self) -> set[Path]:
        return set(self.instance_files or [])


def beside(value: str | bool | None, default: Path, key: str, name: str, folder: bool = False) -> Path | None:
    """The file or folder of an optional input: ``value`` when set, none when ``false``, else
    ``default`` when it exists (logged, so the user knows it was picked up)."""
    if value is False:
        return None
    if value is not None and value is not True:
        return Path(value)
    if (default.is_dir() if folder else default.is_file()):
        log.info("dataset '%s': using %s (found beside the data; %s=false ignores it)", name, default, key)
        return default
    if value is True:
        raise FileNotFoundError(f"dataset '{name}': {key}=true but there is no {default}")
    return None


def check_intensity_range(value: Sequence[float] | None, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    values = list(value)
    if len(values) != 2 or not float(values[0]) < float(values[1]):
        raise ValueError(f"dataset '{name}': intensity_range must be [lo, hi] with lo < hi, got {values} "
                         "(data.intensity_range)")
    return float(values[0]), float(values[1])


def check_patch_size(name: str, files: Sequence[Path], patch_size: int) -> None:
    """Warn once about training images smaller than ``patch_size`` (they are mirror-padded);
    refuse those below ``MIN_PATCH_FRACTION`` of it on a side."""
    small, tiny = [], []
    for f in files:
        height, width = image_size(f)
        if min(height, width) < patch_size:
            small.append(f"{f.name} ({width}x{height})")
            if min(height, width) < MIN_PATCH_FRACTION * patch_size:
                tiny.append(small[-1])
    if tiny:
        raise ValueError(
            f"dataset '{name}': images smaller than {MIN_PATCH_FRACTION:g} x data.patch_size={patch_size} on a side: "
            f"{tiny[:10]}{'...' if len(tiny) > 10 else ''}; mirror-padding them would invent most of each patch. "
            "Lower data.patch_size or remove these images")
    if small:
        log.warning("dataset '%s': %d training images are smaller than data.patch_size=%d and are mirror-padded "
                    "to it: %s%s", name, len(small), patch_size, small[:10], "..." if len(small) > 10 else "")
