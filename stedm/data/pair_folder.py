"""The synthetic-pair folder: what ``predict_diff.py`` writes and ``*_syn`` entries, QC and the
contact sheet read.

A folder holds ``img_00000.png`` (RGB) + ``seg_00000.png`` (uint8 class ids) pairs, each file
written atomically; ``manifest.jsonl``, one JSON object per finished pair (``index``, layout and
style sources, seed, sampler, checkpoint ...), appended once both of its files are complete;
while several processes write, ``manifest.rank<r>.jsonl`` for the pairs of rank ``r > 0``, merged
into the manifest by rank zero; and ``.stedm_settings.json``, what decided the pairs
(``settings_of`` in :mod:`stedm.tasks.predict`). When the manifest is present only the pairs it
records count.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from stedm.compat import upgrade
from stedm.config import differences
from stedm.data.contract import IGNORE_INDEX
from stedm.data.io import read_image, read_mask
from stedm.fileio import is_temporary, remove_temporaries, write_text_atomic

PAIR_IMAGE = "img_{:05d}.png"
PAIR_MASK = "seg_{:05d}.png"
MANIFEST = "manifest.jsonl"
RANK_MANIFEST = "manifest.rank{}.jsonl"  # the records of rank > 0, until rank zero merges them
SETTINGS = ".stedm_settings.json"
_INDEX = re.compile(r"img_(\d+)\.png$")
log = logging.getLogger(__name__)


# -- manifest ----------------------------------------------------------------------------------
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


def merge_rank_manifests(folder: Path) -> None:
    """Move the records of the other ranks' manifests into ``manifest.jsonl`` (rank zero's job: it
    is the manifest's one writer). A line cut short by a kill is dropped: its pair is redone."""
    done = read_manifest(folder)
    for part in sorted(folder.glob(RANK_MANIFEST.format("*"))):
        records = []
        for line in part.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        append_manifest(folder / MANIFEST, [r for r in records if int(r["index"]) not in done])
        part.unlink()


def pair_indices(folder: Path, limit: int | None = None, manifest: dict[int, dict] | None = None) -> list[int]:
    """The complete pairs of a folder (image and mask both there), in manifest order or, for a
    folder without manifest, by file name; at most ``limit``. ``manifest``: the folder's
    :func:`read_manifest`, when the caller has read it already."""
    folder = Path(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    indices = sorted(manifest) or sorted(int(m.group(1)) for p in folder.iterdir() if (m := _INDEX.match(p.name)))
    return [i for i in indices if (folder / PAIR_IMAGE.format(i)).is_file()
            and (folder / PAIR_MASK.format(i)).is_file()][:limit]


# -- settings ----------------------------------------------------------------------------------
def folder_settings(folder: Path, unreadable: str = "; it records how the pairs were written") -> dict:
    """The pair folder's settings as ``predict_diff.py`` wrote them ({} if it has none), under
    today's keys (:func:`stedm.compat.upgrade`: a folder written before a key moved still resumes);
    an unreadable file is refused, the message ending in ``unreadable``."""
    path = Path(folder) / SETTINGS
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err}){unreadable}") from None
    return upgrade(settings)


def layout_classes_of(folder: Path) -> int | None:
    """Classes of the layout the pairs were drawn in (the masks' label space): the settings'
    ``layout_classes``; folders written before it was recorded wrote the data's masks as they
    were (``num_classes``); None when the folder has no settings (pairs made elsewhere)."""
    return _settings_classes(folder_settings(folder))


def _settings_classes(settings: dict) -> int | None:
    value = settings.get("layout_classes", settings.get("num_classes"))
    return None if value is None else int(value)


def layout_class_names(data: dict[str, Any], layout_classes: int) -> list[str]:
    """Names of the layout's classes: the data's, or background / foreground for a binary layout."""
    names = [str(n) for n in data.get("class_names") or []]
    if len(names) == layout_classes:
        return names
    return [names[0] if names else "background", "foreground"] if layout_classes == 2 else \
        [f"class {i}" for i in range(layout_classes)]


# -- reading the pairs -------------------------------------------------------------------------
@dataclass
class Pairs:
    """The complete pairs of a folder (:func:`read_pairs`); their files are read on first use,
    once for every reader."""

    folder: Path
    settings: dict
    manifest: dict[int, dict]
    indices: list[int]

    @cached_property
    def images(self) -> dict[int, np.ndarray]:
        return {i: read_image(self.folder / PAIR_IMAGE.format(i)) for i in self.indices}

    @cached_property
    def masks(self) -> dict[int, np.ndarray]:
        return {i: read_mask(self.folder / PAIR_MASK.format(i)) for i in self.indices}

    def first(self, n: int) -> Pairs:
        """The first ``n`` of these pairs (sharing the files read already)."""
        part = Pairs(self.folder, self.settings, self.manifest, self.indices[:n])
        for name in ("images", "masks"):
            if name in self.__dict__:
                part.__dict__[name] = {i: self.__dict__[name][i] for i in part.indices}
        return part

    @property
    def layout_classes(self) -> int:
        """:func:`layout_classes_of`; for pairs made elsewhere, the classes their masks show."""
        return _settings_classes(self.settings) or max(int(m[m != IGNORE_INDEX].max(initial=0))
                                                       for m in self.masks.values()) + 1


def read_pairs(folder: Path, limit: int | None = None) -> Pairs:
    """The folder's settings, manifest and first ``limit`` complete pairs (:func:`pair_indices`)."""
    folder = Path(folder)
    settings, manifest = folder_settings(folder), read_manifest(folder)
    return Pairs(folder, settings, manifest, pair_indices(folder, limit, manifest))


# -- writing -----------------------------------------------------------------------------------
def open_output(folder: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Create or reuse ``folder`` and gather the pairs an earlier run finished into the manifest.
    Never mixes two settings: a refusal names each setting that differs."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = folder / SETTINGS
    has_pairs = any(folder.glob("img_*.png")) or (folder / MANIFEST).is_file()
    if stored.is_file():
        try:
            changed = differences(folder_settings(folder, ": the folder's settings are unknown; choose another "
                                                          "+predict_dir, or pass overwrite=true to replace its pairs"),
                                  settings)
        except ValueError:
            if not overwrite:
                raise
            changed = ["the settings file is unreadable"]
        if changed and has_pairs:
            if not overwrite:
                raise FileExistsError(
                    f"{folder} holds pairs written with other settings:\n  " + "\n  ".join(changed)
                    + "\nchoose another +predict_dir, or pass overwrite=true to replace them")
            log.warning("overwrite=true: replacing the pairs in %s (%s)", folder, "; ".join(changed))
            for path in [*folder.glob("*_*.png"), folder / MANIFEST, *folder.glob(RANK_MANIFEST.format("*"))]:
                path.unlink(missing_ok=True)
    elif any(not is_temporary(p) for p in folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty and was not written by predict_diff.py; "
                              "choose another +predict_dir, or pass overwrite=true")
    remove_temporaries(folder)
    write_text_atomic(json.dumps(settings, indent=1, sort_keys=True), stored, sync=True)
    repair_manifest(folder)
    merge_rank_manifests(folder)
