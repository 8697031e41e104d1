"""``data.slide_reader=tiffslide``: tiffslide reads the fixture slides as OpenSlide does.

Tolerance: lossless (zlib) tiles must give the same pixels; JPEG tiles may differ by the
decoders' rounding (tiffslide decodes through imagecodecs, OpenSlide through its own
libjpeg-turbo build): at most one grey level on average and a few at any pixel. Pixels outside
the slide are white for every reader.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile

from stedm.data.wsi.slide import SlideReader
from wsi_fixtures import quadrant_image, write_pyramid_tiff, write_svs

# (x0, y0, width, height, downsample) in level-0 pixels: level 0, level 1 (x2), level 2 (x4),
# the right/bottom edge tiles (partly outside the slide) and an area-resized read.
REGIONS = [(0, 0, 64, 64, 1), (70, 130, 64, 48, 1), (64, 32, 40, 40, 2), (200, 200, 40, 40, 2),
           (128, 64, 32, 32, 4), (220, 236, 24, 24, 4), (-8, -8, 20, 20, 2), (0, 0, 40, 40, 6.5)]


def smooth_slide(size: int) -> np.ndarray:
    image = quadrant_image(size, size)
    image[..., 1] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
    return image


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_tiffslide_reads_generic_tiff_as_openslide_does(tmp_path, compression):
    path = write_pyramid_tiff(tmp_path / "s.tif", smooth_slide(250), (2, 4), compression=compression)
    ours, theirs = SlideReader(path, reader="tiffslide"), SlideReader(path, reader="openslide")
    assert (ours.reader, theirs.reader) == ("tiffslide", "openslide")
    assert len(ours.level_downsamples) == 3
    levels = set()
    for region in REGIONS:
        levels.add(ours.level_for(region[4])[0])
        a, b = ours.read(*region).astype(int), theirs.read(*region).astype(int)
        assert a.shape == b.shape == (region[3], region[2], 3)
        if compression == "zlib":
            assert np.array_equal(a, b), region
        else:
            assert np.abs(a - b).mean() <= 1.0 and np.abs(a - b).max() <= 8, region
    assert levels == {0, 1, 2}
    edge = ours.read(220, 236, 24, 24, 4)  # level 2 is 62 x 62: the last two columns/rows lie outside
    assert (edge[-2:] == 255).all() and (edge[:, -2:] == 255).all()


def test_tiffslide_reads_aperio_svs(tmp_path):
    path = write_svs(tmp_path / "s.svs", smooth_slide(1001))
    ours, theirs = SlideReader(path, reader="tiffslide"), SlideReader(path, reader="openslide")
    assert ours.reader == "tiffslide"
    for region in [(0, 0, 64, 64, 1), (960, 960, 64, 64, 1), (400, 400, 64, 64, 4), (800, 800, 64, 64, 4)]:
        a, b = ours.read(*region).astype(int), theirs.read(*region).astype(int)
        # level 1 (x4.004): OpenSlide interpolates the sub-pixel offset, tiffslide starts at the nearest pixel
        assert np.abs(a - b).mean() <= (1.0 if region[4] == 1 else 3.0), region


def test_tiffslide_reader_survives_pickling(tmp_path):
    path = write_pyramid_tiff(tmp_path / "s.tif", smooth_slide(128), (2,))
    reader = pickle.loads(pickle.dumps(SlideReader(path, reader="tiffslide")))
    assert np.array_equal(reader.read(0, 0, 32, 32, 2), SlideReader(path, reader="openslide").read(0, 0, 32, 32, 2))



def test_tiffslide_reads_grey_slides_as_rgb(tmp_path):
    path = tmp_path / "grey.tif"
    ramp = np.tile(np.arange(128, dtype=np.uint8)[None], (128, 1))
    tifffile.imwrite(path, ramp, tile=(64, 64), compression="zlib", photometric="minisblack")
    reader = SlideReader(path, reader="tiffslide")
    assert reader.reader == "tiffslide"
    assert np.array_equal(reader.read(0, 0, 8, 2, 1), np.repeat(ramp[:2, :8, None], 3, axis=2))
