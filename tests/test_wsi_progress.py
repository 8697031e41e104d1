"""Whole-slide dataset setup says what it does: per slide, with counts and cache hits."""

from __future__ import annotations

import logging

from stedm.data.wsi import WSIDataset
from wsi_fixtures import rectangle, tissue_image, write_wsi_folder


def test_setup_logs_each_slide_with_counts_and_cache_hits(tmp_path, caplog):
    image = tissue_image(256, 256, [(32, 32, 224, 224)])
    features = [("Background", [rectangle(32, 32, 224, 224)]), ("Tumor", [rectangle(96, 96, 160, 160)])]
    root = write_wsi_folder(tmp_path / "wsi", {f"s{i}": (image, features) for i in range(2)})

    def build(role):
        return WSIDataset("w", str(root / "slides"), annotations_dir=str(root / "annotations"), role=role,
                          label_dict={"Background": 0, "Tumor": 1}, num_classes=2, patch_size=32, downsample=2,
                          annotation_downsample=8, tissue={"downsample": 8}, val_fraction=0, test_fraction=0,
                          class_train_samples=1, cache_dir=str(tmp_path / "cache"))

    with caplog.at_level(logging.INFO, logger="stedm.data.wsi.dataset"):
        build("labelled"), build("unlabelled")
    first = caplog.text
    assert "dataset 'w': 1 labelled train slide(s) of 2 listed" in first
    assert "s0.tif: 2 polygons from s0.geojson, lookup map 32x32, parsed and rasterised in" in first
    assert "annotations of 1 slide(s) in" in first and "(0 from cache, 1 parsed)" in first
    assert "s1.tif: tissue on" in first and "of a 32x32 thumbnail, detected in" in first
    assert "tissue masks of 1 slide(s)" in first and "(0 from cache, 1 detected on thumbnails)" in first
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stedm.data.wsi.dataset"):
        build("labelled"), build("unlabelled")
    assert "s0.tif: 2 polygons from s0.geojson, lookup map 32x32, from cache" in caplog.text
    assert "(1 from cache, 0 parsed)" in caplog.text and "(1 from cache, 0 detected on thumbnails)" in caplog.text
