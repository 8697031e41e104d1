"""Regions of tiled TIFF pyramid levels read with tifffile + imagecodecs, through a bounded tile cache.

Why not OpenSlide for these: OpenSlide composites every region on an ARGB surface that we then
convert to RGB, about 6 ms per 512-px region even when all its tiles are cached. Here a region
costs the decoding of the tiles it touches that are not cached (libjpeg-turbo, as in OpenSlide)
and a copy of each tile's overlap. Only formats whose pyramid levels are plain tiled pages take
this path (generic tiled TIFF, Aperio SVS); :class:`~stedm.data.wsi.slide.SlideReader` matches
the pages to OpenSlide's levels and checks a tile's pixels against OpenSlide before using it.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

DECODABLE = frozenset({
    tifffile.COMPRESSION.NONE, tifffile.COMPRESSION.LZW, tifffile.COMPRESSION.JPEG,
    tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.DEFLATE, tifffile.COMPRESSION.ZSTD,
    tifffile.COMPRESSION.WEBP,
})
"""Tile compressions decoded to RGB without format-specific colour handling (Aperio's JPEG 2000
variants, 33003/33005, are left to OpenSlide)."""
RGB_PHOTOMETRICS = frozenset({tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR})


class UnsupportedTiff(Exception):
    """The file is not a tiled TIFF pyramid this module reads; the message says why."""


class TileCache:
    """Decoded tiles, least recently used evicted first, at most ``max_bytes`` in all (0: none kept).

    A dataset shares one among its slides. Pickling (spawned DataLoader workers) keeps only the
    budget, so each process holds at most ``max_bytes`` of tiles per dataset.

    Each tile lives in its own anonymous memory map, returned to the OS on eviction, and the
    cache keeps no array object between calls (:meth:`get` returns a fresh view). Long-lived
    tiles, or even the few bytes of an array's shape, on the malloc heap would sit in the holes
    that every sample's large short-lived buffers leave there, so the heap would keep growing:
    by hundreds of MiB to GiBs within a few hundred samples, measured.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"tile cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._tiles: OrderedDict[Hashable, tuple[mmap.mmap, tuple[int, ...]]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._tiles)

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The uint8 tile cached under ``key``, else ``load()``'s result (kept if it fits the budget)."""
        entry = self._tiles.get(key)
        if entry is not None:
            self._tiles.move_to_end(key)
            return np.frombuffer(entry[0], np.uint8).reshape(entry[1])
        tile = load()
        if 0 < tile.nbytes <= self.max_bytes:
            buffer = mmap.mmap(-1, tile.nbytes)
            np.frombuffer(buffer, np.uint8).reshape(tile.shape)[...] = tile
            self._tiles[key] = (buffer, tile.shape)
            self.nbytes += tile.nbytes
            while self.nbytes > self.max_bytes:
                self.nbytes -= len(self._tiles.popitem(last=False)[1][0])
        return tile

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])


@dataclass(frozen=True)
class _Level:
    page: int  # index of the level's page in the TIFF's main IFD chain
    width: int
    height: int
    tile_width: int
    tile_height: int


def _check_page(page: tifffile.TiffPage) -> None:
    if page.compression not in DECODABLE:
        raise UnsupportedTiff(f"tile compression {tifffile.COMPRESSION(page.compression).name}")
    if page.photometric not in RGB_PHOTOMETRICS or page.samplesperpixel != 3 or page.dtype != np.uint8 \
            or page.planarconfig != tifffile.PLANARCONFIG.CONTIG or page.imagedepth != 1:
        raise UnsupportedTiff(f"pixels are not interleaved 8-bit RGB (photometric {page.photometric.name}, "
                              f"{page.samplesperpixel} samples of {page.dtype})")


class TiledTiff:
    """The tiled pages of a TIFF whose sizes are ``level_sizes`` (``(width, height)`` per level,
    finest first), read region by region; tiles pass through ``cache``.

    The file is opened lazily once per process (DataLoader workers reopen it rather than share the
    parent's file offset); pickling drops the handle.
    """

    def __init__(self, path: str | Path, level_sizes: Sequence[tuple[int, int]], cache: TileCache) -> None:
        self.path, self.cache = Path(path), cache
        self._file: tifffile.TiffFile | None = None
        self._pages: list[tifffile.TiffPage] = []
        self._pid: int | None = None
        try:
            with tifffile.TiffFile(self.path) as tiff:
                pages = [(i, p) for i, p in enumerate(tiff.pages) if p.is_tiled]
        except tifffile.TiffFileError as err:
            raise UnsupportedTiff(f"tifffile cannot parse it ({err})") from None
        levels = []
        for size in level_sizes:
            index, page = next(((i, p) for i, p in pages if (p.imagewidth, p.imagelength) == tuple(size)),
                               (None, None))
            if page is None:
                raise UnsupportedTiff(f"no tiled page of size {tuple(size)} (an OpenSlide level)")
            _check_page(page)
            levels.append(_Level(index, page.imagewidth, page.imagelength, page.tilewidth, page.tilelength))
        self.levels = levels

    def _open(self) -> tuple[tifffile.TiffFile, list[tifffile.TiffPage]]:
        """This process's file handle and the level pages (parsed once: a page object reads its IFD)."""
        if self._file is None or self._pid != os.getpid():
            self._file = tifffile.TiffFile(self.path)
            self._pages = [self._file.pages[level.page] for level in self.levels]
            self._pid = os.getpid()
        return self._file, self._pages

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pages": [], "_pid": None}

    def _decode(self, level: int, index: int) -> np.ndarray:
        """Tile ``index`` of ``level`` as tile_height x tile_width x 3 (a missing tile is white)."""
        spec = self.levels[level]
        file, pages = self._open()
        page = pages[level]
        count = page.databytecounts[index]
        if count == 0:
            return np.full((spec.tile_height, spec.tile_width, 3), 255, np.uint8)
        handle = file.filehandle
        handle.seek(page.dataoffsets[index])
        data = handle.read(count)  # before page.decode: building the decoder may move the file position
        tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
        return tile.reshape(spec.tile_height, spec.tile_width, 3)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``height x width x 3`` uint8 of ``level`` with top-left ``(x, y)`` in its pixels; outside is white."""
        spec = self.levels[level]
        inside = x >= 0 and y >= 0 and x + width <= spec.width and y + height <= spec.height
        out = np.empty((height, width, 3), np.uint8) if inside else np.full((height, width, 3), 255, np.uint8)
        tw, th = spec.tile_width, spec.tile_height
        across = -(-spec.width // tw)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, spec.width), min(y + height, spec.height)
        for row in range(y0 // th, -(-y1 // th) if y1 > y0 else 0):
            for col in range(x0 // tw, -(-x1 // tw) if x1 > x0 else 0):
                index = row * across + col
                tile = self.cache.get((str(self.path), level, index), lambda index=index: self._decode(level, index))
                tx0, ty0 = max(x0, col * tw), max(y0, row * th)
                tx1, ty1 = min(x1, (col + 1) * tw), min(y1, (row + 1) * th)
                part = tile[ty0 - row * th:ty1 - row * th, tx0 - col * tw:tx1 - col * tw]
                out[ty0 - y:ty1 - y, tx0 - x:tx1 - x] = part
        return out
