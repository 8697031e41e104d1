"""Runs that could not train, or would fail after training, are refused before any work starts,
with messages naming the config key (or the file) and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from PIL import Image

from conftest import write_folder_dataset
from stedm.data.datamodule import StedmDataModule
from stedm.data.datasets.folder import FolderDataset
from stedm.data.verify import CACHE_FILE
from stedm.run import build_datamodule, prepare
from stedm.tasks.segmentation import train_segmentation

TINY = ["preset=tiny", "data.patch_size=32", "data.samples=16", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "location.precision=32-true"]


def nothing_trained(cfg) -> bool:
    return not list((Path(cfg.location.result_dir) / "checkpoints").rglob("*.ckpt"))


def test_epoch_shorter_than_one_batch_is_refused_before_training(compose_cfg):
    cfg = compose_cfg("train_seg", [*TINY, "data.batch_base=64"])
    with pytest.raises(ValueError, match=r"data.samples=16 x data.ratios=\[1.0\] gives 16 training items per epoch, "
                                         r"fewer than one batch of 64 \(data.batch_base x location.batch_mul\)"):
        train_segmentation(cfg)
    assert nothing_trained(cfg)


def test_share_per_process_shorter_than_one_batch_is_refused_at_setup(compose_cfg):
    cfg = compose_cfg("train_seg", TINY)
    datamodule = StedmDataModule(cfg.data, batch_size=12, eval_splits=())  # 16 items fill one batch of 12 ...
    datamodule.trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"16 training items per epoch shared by 2 processes = 8 per process, "
                                         r"fewer than one batch of 12"):
        datamodule.setup("fit")  # ... but not 8 per process


@pytest.mark.parametrize("overrides, key", [
    (["data.samples=0"], "data.samples=0"),
    (["data.batch_base=0"], "data.batch_base=0"),
    (["location.batch_mul=0"], "location.batch_mul=0"),
    (["data.batch_base=-2", "location.batch_mul=-2"], "data.batch_base=-2"),  # product 4 looks fine
    (["data.patch_size=0"], "data.patch_size=0"),
])
def test_count_that_is_not_positive_names_its_key(compose_cfg, overrides, key):
    cfg = compose_cfg("train_seg", [*TINY, *overrides])
    with pytest.raises(ValueError, match=rf"{key} must be a positive whole number"):
        train_segmentation(cfg)
    assert nothing_trained(cfg)


def test_entry_whose_ratio_gives_no_item_is_refused(compose_cfg):
    cfg = compose_cfg("train_diff", ["preset=tiny", "data/dataset=[demo_anno,demo_unanno]", "data.samples=16",
                                     "data.ratios=[1.0,0.05]"])
    with pytest.raises(ValueError, match=r"entry 'demo_unanno' has ratio 0.05 in data.ratios, but "
                                         r"int\(data.samples=16 x 0.05\) = 0 items per epoch; raise data.samples "
                                         r"to at least 20"):
        build_datamodule(cfg, prepare(cfg), eval_splits=())


def test_eval_overlap_not_below_patch_size_names_both_keys(compose_cfg):
    cfg = compose_cfg("train_seg", [*TINY, "data.patch_size=16"])  # the demo's data.eval_overlap is 16
    with pytest.raises((ValueError, InstantiationException),
                       match=r"got data.patch_size=16, data.eval_overlap=16, data.border_crop=0: "
                             r"set data.eval_overlap below data.patch_size"):
        train_segmentation(cfg)
    assert nothing_trained(cfg)


def folder_run(compose_cfg, root: Path):
    return compose_cfg("train_seg", [*TINY, "data=folder", f"data.root={root}", "data.patch_size=32",
                                     "data.eval_overlap=8", "data.samples=16"])


def test_truncated_image_is_refused_before_training_and_good_files_are_remembered(compose_cfg, tmp_path,
                                                                                  monkeypatch):
    root = write_folder_dataset(tmp_path / "folder", n=10)  # 7 train, 1 val, 2 test images
    test_images = [path for path, _ in FolderDataset("f", images_dir=root / "images", masks_dir=root / "masks",
                                                     split="test").items]
    broken = test_images[1]  # read only by trainer.test, after all training, before this check
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 2])
    cfg = folder_run(compose_cfg, root)
    with pytest.raises(ValueError, match=rf"{broken} cannot be read in full .*re-export the file, or remove it"):
        train_segmentation(cfg)
    assert nothing_trained(cfg)

    reads = []
    original = FolderDataset.read_file
    monkeypatch.setattr(FolderDataset, "read_file", lambda self, path: (reads.append(path), original(self, path)))
    broken.write_bytes(good)  # re-exported
    build_datamodule(cfg, prepare(cfg))
    cache = json.loads((Path(cfg.location.result_dir) / "cache" / CACHE_FILE).read_text())
    assert str(broken.resolve()) in cache and len(cache) == 20  # 10 images + 10 masks
    assert broken in reads and len(reads) < 20  # files read well before the refusal were remembered

    reads.clear()
    build_datamodule(cfg, prepare(cfg))
    assert reads == []  # the second run reads nothing again

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(test_images[0])  # a changed file is read again
    build_datamodule(cfg, prepare(cfg))
    assert reads == [test_images[0]]


def glas(root: Path):
    from histology_fixtures import write_glas
    from stedm.data.datasets.glas import GlasDataset

    write_glas(root, train=4, test_a=2, test_b=1)
    return GlasDataset(root=root, split="test"), sorted(root.glob("test*.bmp"))


def monuseg(root: Path):
    from histology_fixtures import write_monuseg
    from stedm.data.datasets.monuseg import MoNuSegDataset

    write_monuseg(root, train=2, test=2)
    return MoNuSegDataset(root=root, split="test"), sorted((root / "test").iterdir())


def flowers(root: Path):
    from conftest import write_flowers
    from stedm.data.datasets.flowers import FlowersDataset

    ids = write_flowers(root, classes=[0, 1])["tstid"]
    dataset = FlowersDataset("flowers_anno", root=str(root), train_classes=[0], unanno_classes=[1], split="test")
    return dataset, sorted([root / "imgs" / f"image_{i:05d}.jpg" for i in ids] +
                           [root / "segs" / f"segmim_{i:05d}.jpg" for i in ids])


def synthetic(root: Path):
    from conftest import write_synthetic_pairs
    from stedm.data.datasets.synthetic import SyntheticPairs

    write_synthetic_pairs(root / "mine", n=3)
    return SyntheticPairs("demo_syn", root=str(root), folder_name="mine"), sorted((root / "mine").glob("*.png"))


@pytest.mark.parametrize("make", [glas, monuseg, flowers, synthetic])
def test_every_file_based_dataset_lists_the_files_it_reads_and_each_is_read_in_full(tmp_path, make):
    from stedm.data.verify import verify_files

    dataset, expected = make(tmp_path / "data")
    assert sorted(dataset.files()) == expected
    assert verify_files([dataset]) == len(expected)
    broken = dataset.files()[-1]  # the last item's annotation: read by no check before trainer.test
    broken.write_bytes(broken.read_bytes()[:-40])
    with pytest.raises(ValueError, match=rf"'{dataset.name}' \(split {dataset.split}\): {broken} cannot be read"):
        verify_files([dataset])
