"""On-disk cache of per-slide arrays derived from slow sources (lookup maps, tissue masks).

Entries are ``<cache_dir>/<key>.npz`` (and ``<key>.labels.npy`` for memory-mapped label masks),
written through a temporary file and an atomic rename, so concurrent processes (DDP ranks)
never read half a file. ``cache_dir=None`` disables caching.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from stedm.fileio import file_digest, write_atomic  # noqa: F401  (file_digest re-exported: the WSI caches key by it)


def cache_key(*parts: Any) -> str:
    """Hex digest of JSON-serialisable ``parts``."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, write)


def load_arrays(cache_dir: Path | None, key: str) -> dict[str, np.ndarray] | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    with np.load(path) as content:
        return {name: content[name] for name in content.files}


def save_arrays(cache_dir: Path | None, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    if cache_dir is not None:
        _write(Path(cache_dir) / f"{key}.npz", lambda fh: np.savez(fh, **arrays))


def mask_cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.labels.npy"


def save_npy(path: Path, array: np.ndarray) -> None:
    _write(path, lambda fh: np.save(fh, array))
