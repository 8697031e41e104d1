"""Reading regions of whole-slide images, never the whole slide at once.

:class:`SlideReader` reads generic tiled TIFF and Aperio SVS slides with its own tile reader
(:mod:`stedm.data.wsi.tiles`: tifffile + imagecodecs and a bounded cache of decoded tiles, about
twice as fast as OpenSlide per region, more with cache hits) and every other format with
OpenSlide. ``reader="openslide"`` reads everything with OpenSlide (the reference path of
``benchmarks/wsi.py --compare``); ``reader="tiffslide"`` reads every slide with tiffslide
(tifffile + zarr, the reader wsinfer offers; :class:`TiffSlideLevels`). OpenSlide always gives the
slide's levels, so every reader reads a region from the same level.

Slides are opened lazily, once per process: DataLoader workers (forked or spawned) reopen them on
first use instead of sharing the parent's file handles, and pickling drops the handles. All
OpenSlide handles of a process share one tile cache; the tile reader's cache is the dataset's
(:class:`~stedm.data.wsi.tiles.TileCache`). Either way memory stays bounded however many slides a
dataset lists.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np
import openslide
import tiffslide

from stedm.data.wsi.tiles import TileCache, TiledTiff, UnsupportedTiff

TILE_CACHE_BYTES = 128 * 2**20
"""Decoded-tile cache shared by every slide a process has open in OpenSlide."""
READERS = ("auto", "openslide", "tiffslide")
"""``auto``: the tile reader for generic tiled TIFF and Aperio SVS, OpenSlide otherwise;
``openslide``: OpenSlide for every slide; ``tiffslide``: tiffslide for every slide (TIFF-based
formats only)."""
TILE_READER_VENDORS = frozenset({"generic-tiff", "aperio"})
"""OpenSlide formats whose pyramid levels are plain tiled TIFF pages."""
CHECK_TOLERANCE = 2.0
"""Largest mean absolute difference (grey levels) allowed between the two readers' pixels of one tile."""

log = logging.getLogger(__name__)
_shared_cache: dict[int, openslide.OpenSlideCache] = {}


def process_tile_cache() -> openslide.OpenSlideCache:
    pid = os.getpid()
    if pid not in _shared_cache:
        _shared_cache.clear()  # a forked child must not reuse its parent's cache object
        _shared_cache[pid] = openslide.OpenSlideCache(TILE_CACHE_BYTES)
    return _shared_cache[pid]


class _LevelCoordinates(tiffslide.TiffSlide):
    """``read_region`` takes the location in the level's own pixels (tiffslide's documented
    extension point), so no level-0 coordinate is rounded twice."""

    def _read_region_loc_transform(self, location: tuple[int, int], level: int) -> tuple[int, int]:
        return location


class TiffSlideLevels:
    """Regions of OpenSlide's levels read with tiffslide: ``read(level, x, y, width, height)`` in
    level pixels, as :class:`~stedm.data.wsi.tiles.TiledTiff` reads them; pixels outside the level
    are white. The file is reopened in each process (pickling drops the handle)."""

    def __init__(self, path: Path, level_dimensions: tuple[tuple[int, int], ...]) -> None:
        self.path, self._slide, self._pid = Path(path), None, None
        try:
            theirs = [tuple(d) for d in self.slide.level_dimensions]
        except Exception as err:  # tifffile / zarr errors of files tiffslide cannot read
            raise ValueError(f"tiffslide cannot read {self.path} ({err}); set data.slide_reader=auto "
                             "(OpenSlide for formats other than tiled TIFF / SVS)") from err
        missing = [d for d in level_dimensions if tuple(d) not in theirs]
        if missing:
            raise ValueError(f"tiffslide does not see OpenSlide's levels {missing} of {self.path} (it sees "
                             f"{theirs}); set data.slide_reader=auto to read this slide")
        self.levels = [theirs.index(tuple(d)) for d in level_dimensions]  # OpenSlide level -> tiffslide level
        self.level_dimensions = [tuple(d) for d in level_dimensions]

    @property
    def slide(self) -> tiffslide.TiffSlide:
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = _LevelCoordinates(str(self.path)), os.getpid()
        return self._slide

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None, "_pid": None}

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        level_width, level_height = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_width), min(y + height, level_height)
        if x1 <= x0 or y1 <= y0:
            return np.full((height, width, 3), 255, dtype=np.uint8)
        region = self.slide.read_region((x0, y0), self.levels[level], (x1 - x0, y1 - y0),
                                        as_array=True, padding=False)[..., :3]
        if region.shape == (height, width, 3):  # inside the level, RGB: nothing to pad or broadcast
            return np.ascontiguousarray(region, dtype=np.uint8)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        out[y0 - y:y1 - y, x0 - x:x1 - x] = region  # a grey slide's one channel fills all three
        return out


def best_level(level_downsamples: tuple[float, ...], downsample: float) -> int:
    """OpenSlide's ``get_best_level_for_downsample``: the last level whose downsample is at most
    ``downsample`` (the finest level when none is)."""
    return max(0, sum(d <= downsample for d in level_downsamples[1:]))


class SlideReader:
    """One slide: its level-0 size and regions read at any downsample.

    Regions are read from the pyramid level OpenSlide's ``get_best_level_for_downsample`` picks
    (the coarsest level at most as coarse as needed) and resized with area interpolation to the
    requested downsample. Pixels outside the slide (transparent in OpenSlide) are white.

    Args:
        path: the slide file. reader: one of :data:`READERS`.
        tile_cache: the tile reader's cache (default: a private one of :data:`TILE_CACHE_BYTES`).
    """

    def __init__(self, path: str | Path, reader: str = "auto", tile_cache: TileCache | None = None) -> None:
        if reader not in READERS:
            raise ValueError(f"slide reader must be one of {READERS}, got '{reader}'")
        self.path = Path(path)
        self._handle: openslide.OpenSlide | None = None
        self._pid: int | None = None
        handle = self.handle
        self.dimensions: tuple[int, int] = tuple(handle.dimensions)  # (width, height) at level 0
        self.level_downsamples: tuple[float, ...] = tuple(handle.level_downsamples)
        self.tiles: TiledTiff | TiffSlideLevels | None = None
        if reader == "tiffslide":
            self.tiles = TiffSlideLevels(self.path, self.handle.level_dimensions)
            difference = self._difference_to_openslide(self.tiles)
            if difference > CHECK_TOLERANCE:
                raise ValueError(f"tiffslide reads {self.path} {difference:.1f} grey levels away from OpenSlide "
                                 "on average (a colour space it does not handle); set data.slide_reader=auto")
        elif reader == "auto":
            try:
                self.tiles = self._tile_reader(TileCache(TILE_CACHE_BYTES) if tile_cache is None else tile_cache)
            except UnsupportedTiff as why:
                log.info("%s: read with OpenSlide, not the faster tile reader (%s)", self.path.name, why)

    @property
    def reader(self) -> str:
        """Which reader reads this slide's regions: ``tiles``, ``tiffslide`` or ``openslide``."""
        if self.tiles is None:
            return "openslide"
        return "tiffslide" if isinstance(self.tiles, TiffSlideLevels) else "tiles"

    @property
    def handle(self) -> openslide.OpenSlide:
        if self._handle is None or self._pid != os.getpid():
            if not self.path.is_file():
                raise FileNotFoundError(f"slide not found: {self.path}")
            try:
                self._handle = openslide.OpenSlide(str(self.path))
            except openslide.OpenSlideUnsupportedFormatError:
                raise ValueError(
                    f"OpenSlide cannot read {self.path}: use a format it supports (Aperio SVS, "
                    "Hamamatsu NDPI, MIRAX, tiled pyramidal TIFF ...); convert a plain TIFF with e.g. "
                    "`vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`") from None
            except openslide.OpenSlideError as err:
                raise ValueError(f"OpenSlide failed to open {self.path}: {err}") from err
            self._handle.set_cache(process_tile_cache())
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": None}

    def _tile_reader(self, cache: TileCache) -> TiledTiff:
        """The tile reader of OpenSlide's levels, if the format has plain tiled levels and the first
        tile of the coarsest level reads as OpenSlide reads it (a wrong colour space would not)."""
        vendor = self.handle.properties.get(openslide.PROPERTY_NAME_VENDOR)
        if vendor not in TILE_READER_VENDORS:
            raise UnsupportedTiff(f"format '{vendor}'")
        tiles = TiledTiff(self.path, self.handle.level_dimensions, cache)
        spec = tiles.levels[-1]
        difference = self._difference_to_openslide(tiles, (spec.tile_width, spec.tile_height))
        if difference > CHECK_TOLERANCE:
            raise UnsupportedTiff(f"its pixels differ from OpenSlide's by {difference:.1f} grey levels on average")
        return tiles

    def _difference_to_openslide(self, tiles: TiledTiff | TiffSlideLevels, tile: tuple[int, int] = (256, 256)) -> float:
        """Mean absolute difference to OpenSlide of the first ``tile`` of the coarsest level."""
        level = len(self.level_downsamples) - 1
        width, height = self.handle.level_dimensions[level]
        size = (min(tile[0], width), min(tile[1], height))
        ours = tiles.read(level, 0, 0, *size).astype(np.float32)
        return float(np.abs(ours - self._read_openslide(0, 0, level, size).astype(np.float32)).mean())

    def level_for(self, downsample: float) -> tuple[int, float]:
        """The pyramid level a read at ``downsample`` uses, and that level's downsample."""
        level = best_level(self.level_downsamples, downsample)
        return level, self.level_downsamples[level]

    def _read_openslide(self, x0: int, y0: int, level: int, size: tuple[int, int]) -> np.ndarray:
        rgba = np.asarray(self.handle.read_region((int(x0), int(y0)), level, size))
        rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        alpha = rgba[..., 3]
        if not alpha.all():  # outside the slide (or a missing tile): transparent -> white
            rgb[alpha == 0] = 255
        return rgb

    def read(self, x0: int, y0: int, width: int, height: int, downsample: float) -> np.ndarray:
        """``height x width x 3`` uint8 RGB at ``downsample``; top-left corner at level-0 ``(x0, y0)``.

        The tile reader starts the region at the level pixel nearest to ``(x0, y0)``; OpenSlide
        interpolates the sub-pixel offset that a level with a non-integer downsample leaves.
        """
        level, level_downsample = self.level_for(downsample)
        scale = downsample / level_downsample
        size = (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))
        if self.tiles is not None:
            rgb = self.tiles.read(level, round(x0 / level_downsample), round(y0 / level_downsample), *size)
        else:
            rgb = self._read_openslide(x0, y0, level, size)
        if size != (width, height):
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        return rgb

    def read_centred(self, x: float, y: float, size: int, downsample: float) -> np.ndarray:
        """``size x size`` patch at ``downsample`` centred on level-0 ``(x, y)`` (see :meth:`patch_origin`)."""
        return self.read(*self.patch_origin(x, y, size, downsample), size, size, downsample)

    def patch_origin(self, x: float, y: float, size: int, downsample: float) -> tuple[int, int]:
        """Level-0 top-left corner of the ``size``-pixel patch centred on ``(x, y)``.

        When the level read from has an integer downsample, the corner snaps to that level's
        pixel grid (moving the patch by less than one level pixel): OpenSlide composites
        sub-pixel offsets with a filter that is about 3x slower and blurs. Levels with a
        non-integer downsample (Aperio SVS: e.g. 4.0001) cannot be aligned and take that path.
        """
        half = size * downsample / 2
        step = self.level_for(downsample)[1]
        step = round(step) if abs(step - round(step)) < 1e-9 else 1
        return round((x - half) / step) * step, round((y - half) / step) * step

    def thumbnail(self, downsample: float, strip_rows: int = 512) -> np.ndarray:
        """The whole slide at ``downsample`` (for tissue detection), read in strips of output rows."""
        width = max(1, math.ceil(self.dimensions[0] / downsample))
        height = max(1, math.ceil(self.dimensions[1] / downsample))
        strips = [self.read(0, round(row * downsample), width, min(strip_rows, height - row), downsample)
                  for row in range(0, height, strip_rows)]
        return np.concatenate(strips)
