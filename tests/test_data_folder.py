"""Bring-your-own-data (`folder`): 16-bit images, cases.csv and instances/ found beside the data,
and images smaller than the patch size."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import write_folder_dataset
from stedm.data.datamodule import StedmDataModule
from stedm.data.datasets.folder import FolderDataset

ALL_TRAIN = dict(val_fraction=0, test_fraction=0)


def folder(root, **kwargs) -> FolderDataset:
    return FolderDataset("f", images_dir=root / "images", masks_dir=root / "masks", **{**ALL_TRAIN, **kwargs})


def test_16_bit_images_are_scaled_by_bit_depth_not_clipped(tmp_path):
    root = write_folder_dataset(tmp_path / "f", n=3)
    grey = (np.arange(40 * 40).reshape(40, 40) * 41 % 65536).astype(np.uint16)  # spans 0..65535
    rgb = np.stack([grey, 65535 - grey, grey // 2], axis=-1)
    for i in range(3):
        (root / "images" / f"img{i}.png").unlink()
    Image.fromarray(grey).save(root / "images" / "img0.png")  # 16-bit grey PNG
    tifffile.imwrite(root / "images" / "img1.tif", grey)
    tifffile.imwrite(root / "images" / "img2.tif", rgb)  # 16-bit RGB TIFF (PIL alone cuts it to 8 bits)
    ds = folder(root)
    expected = {"img0": np.stack([grey] * 3, -1), "img1": np.stack([grey] * 3, -1), "img2": rgb}
    for i in range(len(ds)):
        record = ds.load(i)
        want = np.rint(expected[record.case] / 257.0).astype(np.uint8)
        assert record.image.dtype == np.uint8 and np.array_equal(record.image, want), record.case
        assert (record.image == 255).mean() < 0.01  # not the saturated white of clipping at 255

    # a 12-bit camera: its own range maps to 0..255
    twelve = (grey >> 4).astype(np.uint16)
    tifffile.imwrite(root / "images" / "img1.tif", twelve)
    record = folder(root, intensity_range=[0, 4095]).load(1)
    assert np.array_equal(record.image[..., 0], np.rint(twelve * (255 / 4095)).astype(np.uint8))
    with pytest.raises(ValueError, match=r"intensity_range must be \[lo, hi\].*data.intensity_range"):
        folder(root, intensity_range=[10, 10])
    tifffile.imwrite(root / "images" / "img1.tif", grey.astype(np.float32) * 3)
    with pytest.raises(ValueError, match=r"img1.tif has float32 pixels.*data.intensity_range=\[lo,hi\]"):
        folder(root).load(1)


def test_cases_csv_beside_the_images_is_used_and_logged(tmp_path, caplog):
    rows = [f"img{i}.png,patient{i // 2},{'test' if i < 2 else 'train'}" for i in range(6)]
    root = write_folder_dataset(tmp_path / "f", n=6, csv_rows=rows)
    with caplog.at_level(logging.INFO, logger="stedm.data.datasets.folder"):
        test = FolderDataset("f", images_dir=root / "images", masks_dir=root / "masks", split="test")
    assert [p.stem for p, _ in test.items] == ["img0", "img1"] and test.cases() == ["patient0", "patient0"]
    assert f"using {root / 'cases.csv'}" in caplog.text and "data.dataset.f.csv_path=false" in caplog.text
    # csv_path=false: the file is ignored and cases are the file stems
    ignored = FolderDataset("f", images_dir=root / "images", masks_dir=root / "masks", csv_path=False, **ALL_TRAIN)
    assert ignored.cases() == [f"img{i}" for i in range(6)]


def write_instances(root, n: int, size: int = 40) -> dict[str, np.ndarray]:
    """Two touching objects per image: one connected component, two instances."""
    (root / "instances").mkdir()
    written = {}
    for i in range(n):
        instances = np.zeros((size, size), np.uint16)
        instances[4:12, 4:10], instances[4:12, 10:16] = 300 + i, 7  # ids beyond 8 bits
        tifffile.imwrite(root / "instances" / f"img{i}.tif", instances)
        written[f"img{i}"] = instances.astype(np.int64)
    return written


def test_instance_masks_beside_the_masks_become_sample_instances(compose_cfg, tmp_path):
    root = write_folder_dataset(tmp_path / "data" / "folder", n=6)
    written = write_instances(root, 6)
    cfg = compose_cfg("train_seg", ["data=folder", "data.patch_size=32", "data.samples=4"])
    dm = StedmDataModule(cfg.data, batch_size=2)
    sample = dm.eval_sets["test"][0]
    case = sample["meta"]["case"]
    assert torch.equal(sample["instances"], torch.from_numpy(written[case]))
    assert len(sample["instances"].unique()) == 3  # two touching objects stay two
    assert "instances" in dm.train_sets[0][0] and sample["instances"].shape == sample["mask"].shape

    (root / "instances" / "img3.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"no instance mask for image img3.png .*instances_dir=false"):
        folder(root)
    ds = folder(root, instances_dir=False)
    assert ds.load(0).instances is None


def test_images_smaller_than_the_patch_are_named_and_tiny_ones_refused(compose_cfg, tmp_path, caplog):
    root = write_folder_dataset(tmp_path / "data" / "folder", n=3, size=40)
    with caplog.at_level(logging.WARNING, logger="stedm.data.datasets.folder"):
        folder(root, patch_size=32)
        assert caplog.text == ""
        folder(root, patch_size=48)
    assert caplog.text.count("smaller than data.patch_size=48") == 1  # one warning per dataset
    assert all(f"img{i}.png (40x40)" in caplog.text for i in range(3))
    with pytest.raises(ValueError, match=r"smaller than 0.5 x data.patch_size=96 .*img0.png \(40x40\).*Lower data.patch_size"):
        folder(root, patch_size=96)
    cfg = compose_cfg("train_seg", ["data=folder", "data.patch_size=96"])
    with pytest.raises(ValueError, match="data.patch_size=96"):
        StedmDataModule(cfg.data, batch_size=2)
