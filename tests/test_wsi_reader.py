"""The tile reader (tifffile + imagecodecs) against OpenSlide, its fallback, its cache, and the
``slide_reader`` switch that keeps the OpenSlide reference path selectable."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import openslide
import pytest
import tifffile
from hydra.utils import instantiate
from wsi_fixtures import (
    quadrant_image,
    rectangle,
    tissue_image,
    write_pyramid_tiff,
    write_svs,
    write_wsi_folder,
)

from stedm.data.datamodule import StedmDataModule
from stedm.data.wsi.slide import SlideReader, best_level
from stedm.data.wsi.tiles import TileCache

# Regions (level-0 x, y, width, height, downsample) on their level's pixel grid, as training
# patches are (SlideReader.patch_origin): inside, across tiles, past the slide's edges, resized.
REGIONS = [(0, 0, 96, 96, 1), (70, 37, 130, 90, 1), (10, 6, 120, 100, 2), (4, 8, 60, 60, 4), (-40, 170, 80, 64, 2),
           (180, 180, 90, 90, 1), (0, 0, 40, 40, 6.5)]


def smooth_slide(size: int) -> np.ndarray:
    """Quadrants with a horizontal ramp in green: edges and gradients, little for JPEG to lose."""
    image = quadrant_image(size, size)
    image[..., 1] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
    return image


def both_readers(path):
    return SlideReader(path), SlideReader(path, reader="openslide")


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_tile_reader_reads_generic_tiff_as_openslide_does(tmp_path, compression):
    ours, theirs = both_readers(write_pyramid_tiff(tmp_path / "s.tif", smooth_slide(256), (2, 4),
                                                   compression=compression))
    assert (ours.reader, theirs.reader) == ("tiles", "openslide")
    for region in REGIONS:
        a, b = ours.read(*region).astype(int), theirs.read(*region).astype(int)
        assert a.shape == b.shape == (region[3], region[2], 3)
        if compression == "zlib":  # lossless: the same pixels
            assert np.array_equal(a, b), region
        else:  # both decode with libjpeg-turbo; allow for a different build's rounding
            assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 8, region
    # Off the level's grid the tile reader starts at the nearest level pixel where OpenSlide
    # interpolates: a shift of a quarter pixel here, about one grey level on the green ramp.
    a, b = ours.read(3, 5, 60, 60, 4).astype(int), theirs.read(3, 5, 60, 60, 4).astype(int)
    assert np.abs(a - b).mean() < 2


@pytest.mark.parametrize("jpeg_colour", ["ycbcr", "rgb"])
def test_tile_reader_reads_aperio_svs_with_non_integer_levels(tmp_path, jpeg_colour):
    path = write_svs(tmp_path / "s.svs", smooth_slide(1001), jpeg_colour=jpeg_colour)
    ours, theirs = both_readers(path)
    assert theirs.handle.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
    assert ours.reader == "tiles" and ours.level_downsamples == pytest.approx((1.0, 1001 / 250))
    for region in [(0, 0, 300, 300, 1), (100, 37, 200, 200, 4.004), (3, 5, 120, 120, 8), (-50, 900, 200, 200, 2)]:
        a, b = ours.read(*region).astype(int), theirs.read(*region).astype(int)
        # The tile reader starts at the nearest level pixel, OpenSlide interpolates the sub-pixel
        # offset: the two differ only along the quadrants' edges.
        assert np.abs(a - b).mean() < 1.0, region
        assert np.median(np.abs(a - b)) == 0, region


def test_level_choice_is_openslides(tmp_path):
    for path in (write_svs(tmp_path / "s.svs", smooth_slide(1001)),
                 write_pyramid_tiff(tmp_path / "p.tif", smooth_slide(256), (2, 4, 8))):
        handle = openslide.OpenSlide(str(path))
        downsamples = tuple(handle.level_downsamples)
        for downsample in [0.5, 1, 1.5, 2, 3.99, 4, 1001 / 250, 4.01, 7.9, 8, 9, 100, *downsamples]:
            assert best_level(downsamples, downsample) == handle.get_best_level_for_downsample(downsample), downsample


def test_other_pixel_layouts_fall_back_to_openslide_and_say_so(tmp_path, caplog):
    path = tmp_path / "grey.tif"
    ramp = np.tile(np.arange(128, dtype=np.uint8)[None], (128, 1))
    tifffile.imwrite(path, ramp, tile=(64, 64), compression="zlib", photometric="minisblack")
    with caplog.at_level(logging.INFO, logger="stedm.data.wsi.slide"):
        reader = SlideReader(path)
    assert reader.reader == "openslide"
    assert "grey.tif: read with OpenSlide" in caplog.text and "MINISBLACK" in caplog.text
    assert np.array_equal(reader.read(0, 0, 8, 2, 1), np.repeat(ramp[:2, :8, None], 3, axis=2))


def test_tile_reader_survives_pickling(tmp_path):
    reader = SlideReader(write_pyramid_tiff(tmp_path / "s.tif", smooth_slide(256), compression="jpeg"))
    before = reader.read(10, 20, 64, 64, 2)
    clone = pickle.loads(pickle.dumps(reader))
    assert len(clone.tiles.cache) == 0  # tiles stay behind, the budget travels
    assert clone.tiles.cache.max_bytes == reader.tiles.cache.max_bytes
    assert np.array_equal(clone.read(10, 20, 64, 64, 2), before)


def test_tile_cache_keeps_the_most_recent_tiles_within_its_budget():
    tile_bytes = 8 * 8 * 3
    cache, loads = TileCache(int(2.5 * tile_bytes)), []

    def get(key):
        return cache.get(key, lambda: loads.append(key) or np.full((8, 8, 3), key, np.uint8))

    for key in (1, 2, 1, 3):  # 1 is used again before 3 arrives, so 2 is the one evicted
        assert np.all(get(key) == key)
    assert loads == [1, 2, 3] and len(cache) == 2 and cache.nbytes == 2 * tile_bytes <= cache.max_bytes
    get(1), get(3), get(2)
    assert loads == [1, 2, 3, 2]
    big = cache.get("big", lambda: np.zeros((16, 16, 3), np.uint8))  # larger than the budget: read, not kept
    assert big.shape == (16, 16, 3) and "big" not in cache._tiles
    nothing = TileCache(0)
    nothing.get(1, lambda: np.zeros((8, 8, 3), np.uint8))
    assert len(nothing) == 0 and nothing.nbytes == 0
    with pytest.raises(ValueError, match="tile cache size"):
        TileCache(-1)


def test_slide_reader_is_chosen_by_config(compose_cfg, tmp_path):
    image = tissue_image(256, 256, [(32, 32, 224, 224)])
    features = [("Hard Negative", [rectangle(32, 32, 224, 224)]), ("HER2 2+", [rectangle(96, 96, 160, 160)])]
    write_wsi_folder(tmp_path / "data" / "her2", {f"s{i}": (image, features) for i in range(3)},
                     ["s0.tif,p0,train,2", "s1.tif,p1,train,3", "s2.tif,p2,train,3"], header="slide,case,split,score")
    small = ["data.patch_size=32", "data.downsample=2", "data.annotation_downsample=8", "data.tissue.downsample=8",
             "data.samples=4", f"location.data_dir={tmp_path / 'data'}", "data/entries=her2_paired"]
    for overrides, expected in (([], "tiles"), (["data.slide_reader=openslide"], "openslide"),
                                (["data.slide_reader=tiffslide"], "tiffslide")):
        cfg = compose_cfg("train_diff", ["data=her2", "style_sampling=mp", *small, *overrides])
        datamodule = StedmDataModule(cfg.data, batch_size=2, style_source=instantiate(cfg.style_sampling.source),
                                     eval_splits=())
        labelled, unlabelled = datamodule.train_sets
        assert {r.reader for r in labelled.readers + unlabelled.readers} == {expected}
        assert labelled.tile_cache.max_bytes == 128 * 2**20
        assert next(iter(datamodule.train_dataloader()))["style"].shape == (2, 10, 3, 32, 32)
