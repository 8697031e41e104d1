"""Synthetic image/mask pairs written by ``predict_diff.py``, read back as a ``*_syn`` entry.

Folder ``root/folder_name`` holds ``img_00000.png`` (RGB) + ``seg_00000.png`` (uint8 class ids)
pairs and ``manifest.jsonl`` (one JSON object per pair: ``index``, layout and style sources,
seed, sampler, checkpoint ...). When the manifest is present only the pairs it records are read
(a pair enters the manifest after both of its files are complete); its fields go into ``meta``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from stedm.data.base import Record, SegmentationDataset
from stedm.data.io import read_image, read_mask, require_dir

PAIR_IMAGE = "img_{:05d}.png"
PAIR_MASK = "seg_{:05d}.png"
MANIFEST = "manifest.jsonl"
_INDEX = re.compile(r"img_(\d+)\.png$")


def read_manifest(folder: Path) -> dict[int, dict]:
    """Index -> manifest record; an empty dict when there is no manifest."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    records = {}
    with path.open() as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
            records[int(record["index"])] = record
    return records


class SyntheticPairs(SegmentationDataset):
    def __init__(self, name: str, root: str, folder_name: str, split: str = "train", **kwargs) -> None:
        super().__init__(name=name, split=split, **kwargs)
        if split != "train":
            raise ValueError(f"dataset '{name}': synthetic pairs are training data only; list a real "
                             "dataset first in data/dataset (validation and test come from the first entry)")
        self.folder = require_dir(Path(root) / str(folder_name), "synthetic pairs",
                                  f"data.dataset.{name}.folder_name")
        self.manifest = read_manifest(self.folder)
        if self.manifest:
            indices = sorted(self.manifest)
        else:
            indices = sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _INDEX.match(p.name)))
        self.indices = [i for i in indices if (self.folder / PAIR_MASK.format(i)).is_file()
                        and (self.folder / PAIR_IMAGE.format(i)).is_file()]
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
