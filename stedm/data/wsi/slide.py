"""Reading regions of whole-slide images through OpenSlide, never the whole slide at once.

:class:`SlideReader` opens its slide lazily, once per process: DataLoader workers (forked or
spawned) reopen it on first use instead of sharing the parent's file handle, and pickling drops
the handle. All handles of a process share one tile cache, so memory stays bounded however many
slides a dataset lists.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import openslide

TILE_CACHE_BYTES = 128 * 2**20
"""Decoded-tile cache shared by every slide a process has open."""

_shared_cache: dict[int, openslide.OpenSlideCache] = {}


def process_tile_cache() -> openslide.OpenSlideCache:
    pid = os.getpid()
    if pid not in _shared_cache:
        _shared_cache.clear()  # a forked child must not reuse its parent's cache object
        _shared_cache[pid] = openslide.OpenSlideCache(TILE_CACHE_BYTES)
    return _shared_cache[pid]


class SlideReader:
    """One slide: its level-0 size and regions read at any downsample.

    Regions are read from the pyramid level :meth:`openslide.OpenSlide.get_best_level_for_downsample`
    picks (the finest level at most as fine as needed) and resized with area interpolation
    to the requested downsample. Pixels outside the slide (transparent in OpenSlide) are white.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle: openslide.OpenSlide | None = None
        self._pid: int | None = None
        handle = self.handle
        self.dimensions: tuple[int, int] = tuple(handle.dimensions)  # (width, height) at level 0

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

    def level_for(self, downsample: float) -> tuple[int, float]:
        """The pyramid level a read at ``downsample`` uses, and that level's downsample."""
        handle = self.handle
        level = handle.get_best_level_for_downsample(downsample)
        return level, handle.level_downsamples[level]

    def read(self, x0: int, y0: int, width: int, height: int, downsample: float) -> np.ndarray:
        """``height x width x 3`` uint8 RGB at ``downsample``; top-left corner at level-0 ``(x0, y0)``."""
        level, level_downsample = self.level_for(downsample)
        scale = downsample / level_downsample
        size = (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))
        rgba = np.asarray(self.handle.read_region((int(x0), int(y0)), level, size))
        rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        alpha = rgba[..., 3]
        if not alpha.all():  # outside the slide (or a missing tile): transparent -> white
            rgb[alpha == 0] = 255
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
