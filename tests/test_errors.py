"""Mistakes a user can make are caught before training, with messages naming the fix."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
import torch

from conftest import write_folder_dataset
from stedm.data.datamodule import StedmDataModule
from stedm.data.datasets.folder import FolderDataset
from stedm.data.style_sources import StyleSource
from stedm.run import resolve_devices


def folder_cfg(compose_cfg, root, extra=()):
    return compose_cfg("train_diff", ["data=folder", f"data.root={root}", "data.patch_size=32", *extra])


def test_ratios_must_pair_with_entries(compose_cfg):
    cfg = compose_cfg("train_diff", ["data/dataset=[demo_anno,demo_unanno]", "data.ratios=[1.0]"])
    with pytest.raises(ValueError, match=r"data.ratios has 1 values but data/dataset lists 2 entries"):
        StedmDataModule(cfg.data, batch_size=2)


def test_missing_data_folder_names_the_key(compose_cfg, tmp_path):
    cfg = folder_cfg(compose_cfg, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"data.dataset.folder_anno.images_dir"):
        StedmDataModule(cfg.data, batch_size=2)


def test_empty_data_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"no images .* in"):
        FolderDataset("mine", images_dir=tmp_path / "images", role="unlabelled")


def test_mask_class_out_of_range_names_the_file(compose_cfg, tmp_path):
    root = write_folder_dataset(tmp_path / "f", n=4, num_classes=3)
    cfg = folder_cfg(compose_cfg, root, ["data.num_classes=2", "data.class_names=[a,b]"])
    with pytest.raises(ValueError, match=r"img\d\.png: mask has class ids \[2\] outside 0..1"):
        StedmDataModule(cfg.data, batch_size=2)


def test_unreadable_image_names_the_file(tmp_path):
    root = write_folder_dataset(tmp_path / "f", n=2)
    (root / "images" / "img0.png").write_bytes(b"not a png")
    ds = FolderDataset("f", images_dir=root / "images", role="unlabelled", val_fraction=0, test_fraction=0)
    with pytest.raises(ValueError, match=r"cannot read image .*img0.png"):
        ds[0]


def test_image_mask_size_mismatch(tmp_path):
    root = write_folder_dataset(tmp_path / "f", n=2)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "masks" / "img1.png")
    with pytest.raises(ValueError, match=r"mask .*img1.png is 12x10 but image .*img1.png is 40x40"):
        FolderDataset("f", images_dir=root / "images", masks_dir=root / "masks", val_fraction=0, test_fraction=0)


def test_style_source_the_dataset_cannot_serve(compose_cfg):
    class NeedsSlides(StyleSource):
        name = "nearby"
        requires = frozenset({"slide"})

    cfg = compose_cfg("train_diff")
    with pytest.raises(ValueError, match=r"style_sampling=nearby needs .*'slide'.* entry 'demo_anno'"):
        StedmDataModule(cfg.data, batch_size=2, style_source=NeedsSlides())


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="this machine has the GPUs location=cluster asks for")
def test_location_asking_for_missing_gpus_fails_at_once(compose_cfg):
    cfg = compose_cfg("train_diff", ["location=cluster"])
    with pytest.raises(RuntimeError, match=r"location.devices=4 .* asks for 4 GPU"):
        resolve_devices(cfg.location)
