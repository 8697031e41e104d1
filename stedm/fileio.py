"""Files written whole and atomically, and file digests: the one home of both.

Every file STEDM writes whole goes through :func:`atomic_path`: the content goes into a hidden
temporary beside the target (``.NAME.XXXXXXXX.tmp``, created with mode 0666 less the umask, like
any file the user makes), which is renamed over the target once complete, so a crash never
leaves half a file. A kill can leave the temporary; :func:`remove_temporaries` clears a folder's.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Callable


@contextmanager
def atomic_path(path: str | Path, sync: bool = False) -> Iterator[Path]:
    """A new, empty temporary file beside ``path`` for the block to write (by name: for writers
    that take a path); renamed over ``path`` when the block ends without error (synced to disk
    first when ``sync``), removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], sync: bool = False) -> None:
    """``write(fh)`` into a binary file handle whose content replaces ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path, sync) as tmp, open(tmp, "wb") as fh:
        write(fh)


def write_text_atomic(text: str, path: str | Path, sync: bool = False) -> None:
    """Write a text file (UTF-8) atomically; ``sync``: durably too (on disk before the rename)."""
    write_atomic(path, lambda fh: fh.write(text.encode()), sync)


def replace_keeping_previous(new: Path, path: Path, previous: Path) -> None:
    """Put the complete file ``new`` in place of ``path``, keeping the old ``path`` as ``previous``
    (a hard link first, so that at every moment one complete file is in place)."""
    if path.is_file():
        staged = path.with_name(f".{previous.name}.{os.getpid()}")
        staged.unlink(missing_ok=True)
        try:
            os.link(path, staged)
        except OSError:  # no hard links on this file system: a copy's worth of time, same guarantee
            shutil.copy2(path, staged)
        os.replace(staged, previous)
    os.replace(new, path)


def is_temporary(path: Path) -> bool:
    """A temporary of :func:`atomic_path` (also those of earlier versions, ``.NAME.XXXX.png.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries that killed writers left in ``folder``; only while no writer runs."""
    found = [p for p in folder.iterdir() if is_temporary(p) and p.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    return found


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content (memoised per path, size and modification time)."""
    stat = Path(path).stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()
