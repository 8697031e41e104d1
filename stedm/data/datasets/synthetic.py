"""Synthetic image/mask pairs written by ``predict_diff.py``, read back as a ``*_syn`` entry.

The folder's format is :mod:`stedm.data.pair_folder`; when it has a manifest only the pairs it
records are read, and their manifest fields go into ``meta``.
"""

from __future__ import annotations

from pathlib import Path

from stedm.data.base import Record, SegmentationDataset
from stedm.data.io import read_image, read_mask, require_dir
from stedm.data.pair_folder import PAIR_IMAGE, PAIR_MASK, layout_classes_of, pair_indices, read_manifest


class SyntheticPairs(SegmentationDataset):
    def __init__(self, name: str, root: str, folder_name: str, split: str = "train", **kwargs) -> None:
        super().__init__(name=name, split=split, **kwargs)
        if split != "train":
            raise ValueError(f"dataset '{name}': synthetic pairs are training data only; list a real "
                             "dataset first in data/dataset (validation and test come from the first entry)")
        self.folder = require_dir(Path(root) / str(folder_name), "synthetic pairs",
                                  f"data.dataset.{name}.folder_name")
        self.manifest = read_manifest(self.folder)
        self.layout_classes = layout_classes_of(self.folder)
        self.indices = pair_indices(self.folder, manifest=self.manifest)
        if not self.indices:
            raise ValueError(f"dataset '{name}': no img_XXXXX.png/seg_XXXXX.png pairs in {self.folder}")

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Record:
        i = self.indices[index]
        record = self.manifest.get(i, {})
        meta = {"pair": i}
        for key in ("layout_case", "style_case"):
            if key in record:
                meta[key] = str(record[key])
        return Record(image=read_image(self.folder / PAIR_IMAGE.format(i)),
                      mask=read_mask(self.folder / PAIR_MASK.format(i)),
                      case=f"syn_{i:05d}", meta=meta)

    def cases(self) -> list[str]:
        return [f"syn_{i:05d}" for i in self.indices]

    def files(self) -> list[Path]:
        return [self.folder / name.format(i) for i in self.indices for name in (PAIR_IMAGE, PAIR_MASK)]
