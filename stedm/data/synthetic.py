"""Synthetic image/mask pairs written by ``predict_diff.py``, read back as a ``*_syn`` entry.

Folder ``root/folder_name`` holds ``img_00000.png`` (RGB) + ``seg_00000.png`` (uint8 class ids)
pairs and ``manifest.jsonl`` (one JSON object per pair: ``index``, layout and style sources,
seed, sampler, checkpoint ...). When the manifest is present only the pairs it records are read
(a pair enters the manifest after both of its files are complete); its fields go into ``meta``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from stedm.data.base import Record, SegmentationDataset
from stedm.data.io import read_image, read_mask, require_dir

PAIR_IMAGE = "img_{:05d}.png"
PAIR_MASK = "seg_{:05d}.png"
MANIFEST = "manifest.jsonl"
SETTINGS = ".stedm_settings.json"  # what predict_diff.py wrote the pairs with (stedm/tasks/predict.py)
_INDEX = re.compile(r"img_(\d+)\.png$")
log = logging.getLogger(__name__)


def _manifest_lines(path: Path) -> tuple[list[tuple[int, dict]], int | None]:
    """``(line number, record)`` of every complete record, and the byte offset where a last line
    cut short by a kill starts (None if there is none). A bad line elsewhere is an error."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, offset = [], 0
    for line_no, line in enumerate(lines, 1):
        last = line_no == len(lines) or (line_no == len(lines) - 1 and lines[-1] == b"")
        if line.strip():
            try:
                records.append((line_no, json.loads(line)))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                if last:  # the unfinished pair: its record was being written when the run stopped
                    return records, offset
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err}); only a cut-short last line is "
                                 "taken for an unfinished pair, so fix or delete this line") from err
        offset += len(line) + 1
    return records, None


def read_manifest(folder: Path) -> dict[int, dict]:
    """Index -> manifest record; an empty dict when there is no manifest. A last line cut short
    (a run killed while writing it) is skipped: its pair does not count as done."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    records, cut = _manifest_lines(path)
    if cut is not None:
        log.warning("%s: the last line is cut short (a run stopped while writing it); that pair is left out",
                    path)
    return {int(record["index"]): record for _, record in records}


def repair_manifest(folder: Path) -> bool:
    """Drop a cut-short last line from the manifest (so appending continues on a fresh line and
    that pair is redone); only while no writer runs. True if there was one."""
    path = folder / MANIFEST
    if not path.is_file():
        return False
    _, cut = _manifest_lines(path)
    if cut is None:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):  # complete, but its newline was not
            with path.open("ab") as fh:
                fh.write(b"\n")
        return False
    with path.open("r+b") as fh:
        fh.truncate(cut)
        os.fsync(fh.fileno())
    log.warning("%s: removed a cut-short last line; its pair is redone", path)
    return True


def append_manifest(path: Path, records: list[dict]) -> None:
    """Append ``records`` (one JSON line each) and sync them to disk."""
    with path.open("a") as fh:
        fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
        fh.flush()
        os.fsync(fh.fileno())


def pair_indices(folder: Path, limit: int | None = None) -> list[int]:
    """The complete pairs of a folder (image and mask both there), in manifest order or, for a
    folder without manifest, by file name; at most ``limit``."""
    folder = Path(folder)
    indices = sorted(read_manifest(folder)) or sorted(int(p.stem.split("_")[1]) for p in folder.glob("img_*.png"))
    return [i for i in indices if (folder / PAIR_IMAGE.format(i)).is_file()
            and (folder / PAIR_MASK.format(i)).is_file()][:limit]


def folder_settings(folder: Path) -> dict:
    """The pair folder's settings as ``predict_diff.py`` wrote them ({} if it has none)."""
    path = Path(folder) / SETTINGS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err}); it records how the pairs were written") from None


def layout_classes_of(folder: Path) -> int | None:
    """Classes of the layout the pairs were drawn in (the masks' label space): the settings'
    ``layout_classes``; folders written before it was recorded wrote the data's masks as they
    were (``num_classes``); None when the folder has no settings (pairs made elsewhere)."""
    settings = folder_settings(folder)
    value = settings.get("layout_classes", settings.get("num_classes"))
    return None if value is None else int(value)


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

    def files(self) -> list[Path]:
        return [self.folder / name.format(i) for i in self.indices for name in (PAIR_IMAGE, PAIR_MASK)]
