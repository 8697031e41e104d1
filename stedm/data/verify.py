"""Read every file of the run's datasets fully once, before training, and remember it.

A truncated or corrupt image otherwise surfaces only when it is drawn - often in
``trainer.test``, after all the training. :func:`verify_files` reads each file a dataset lists
in :meth:`~stedm.data.base.SegmentationDataset.files` (whole slides list none: they are read
patch by patch) with the dataset's own reader, and refuses a broken one by name. Files that read
well are remembered by ``(absolute path, size, mtime)`` in ``<cache_dir>/decoded_files.json``
(under ``location.result_dir``: the data folder may be read-only), so a later run reads only
new or changed files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from stedm.data.base import SegmentationDataset
from stedm.fileio import write_text_atomic

log = logging.getLogger(__name__)

CACHE_FILE = "decoded_files.json"


def file_key(path: Path) -> tuple[str, list[int]]:
    """``(absolute path, [size, mtime in ns])``: a file changed since it was read is read again."""
    stat = path.stat()
    return str(path.resolve()), [stat.st_size, stat.st_mtime_ns]


def load_cache(path: Path) -> dict[str, list[int]]:
    """The remembered files; an unreadable cache (ours, rebuilt on the fly) counts as empty."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def save_cache(path: Path, cache: dict[str, list[int]]) -> None:
    """Written atomically: processes (DDP ranks) writing at once never leave half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(cache), path, sync=True)


def verify_files(datasets: Iterable[SegmentationDataset], cache_dir: str | Path | None = None) -> int:
    """Read every listed file not remembered in ``cache_dir`` (every one without it); return how
    many were read. A file that fails to read raises ``ValueError`` naming it and its entry."""
    cache_path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    cache = load_cache(cache_path) if cache_path is not None else {}
    todo: dict[str, tuple[Path, list[int], SegmentationDataset]] = {}
    for dataset in datasets:
        for path in dataset.files():
            key, stamp = file_key(Path(path))
            if cache.get(key) != stamp and key not in todo:
                todo[key] = (Path(path), stamp, dataset)
    if not todo:
        return 0
    try:
        for key, (path, stamp, dataset) in tqdm(todo.items(), desc="reading data files once", unit="file"):
            try:
                dataset.read_file(path)
            except Exception as err:
                raise ValueError(
                    f"dataset entry '{dataset.name}' (split {dataset.split}): {path} cannot be read in full "
                    f"({err}); re-export the file, or remove it (and its mask) from the data folder, "
                    "then start the run again") from err
            cache[key] = stamp
    finally:
        if cache_path is not None:
            save_cache(cache_path, cache)  # what read well stays remembered, even after a refusal
    log.info("read %d data file(s) in full%s", len(todo), f"; remembered in {cache_path}" if cache_path else "")
    return len(todo)
