"""Registry datasets read their real on-disk formats and honour the sample contract."""

from __future__ import annotations

import numpy as np
import torch

from conftest import write_flowers, write_folder_dataset, write_synthetic_pairs
from stedm.data.contract import IGNORE_INDEX, check_sample, image_to_tensor, tensor_to_image
from stedm.data.datamodule import StedmDataModule
from stedm.data.datasets.demo import DemoDataset, region_roles
from stedm.data.datasets.flowers import FlowersDataset
from stedm.data.datasets.folder import FolderDataset
from stedm.data.datasets.synthetic import SyntheticPairs


def test_range_conversion_round_trips():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    tensor = image_to_tensor(image)
    assert tensor.min() == -1 and tensor.max() == 1 and tensor.shape == (3, 16, 16)
    assert np.array_equal(tensor_to_image(tensor), image)


def test_demo_regions_do_not_overlap_and_follow_class_train_samples():
    roles = region_roles(0)
    for k in (1, 4, 10):
        labelled = DemoDataset("a", role="labelled", class_train_samples=k).regions
        unlabelled = DemoDataset("u", role="unlabelled", class_train_samples=k).regions
        assert len(labelled) == k and len(unlabelled) == 10 - k
        assert not set(labelled) & set(unlabelled)
        assert not (set(labelled) | set(unlabelled)) & (set(roles["test"]) | set(roles["val"]))
    test = DemoDataset("a", role="labelled", split="test")
    assert len(set(test.cases())) >= 4
    sample = test[0]
    check_sample(sample, num_classes=3)
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 2}
    unlabelled = DemoDataset("u", role="unlabelled")[0]
    assert not unlabelled["labelled"] and (unlabelled["mask"] == IGNORE_INDEX).all()


def test_folder_dataset_reads_masks_cases_and_splits(tmp_path):
    rows = [f"img{i}.png,patient{i // 2},{'test' if i >= 4 else 'train'}" for i in range(6)]
    root = write_folder_dataset(tmp_path / "f", n=6, num_classes=3, csv_rows=rows)
    train = FolderDataset("f", images_dir=root / "images", masks_dir=root / "masks", csv_path=root / "cases.csv",
                          num_classes=3)
    assert len(train) == 4 and sorted(set(train.cases())) == ["patient0", "patient1"]
    sample = train[1]
    check_sample(sample, num_classes=3)
    from PIL import Image
    expected = np.array(Image.open(root / "masks" / "img1.png"))
    assert torch.equal(sample["mask"], torch.from_numpy(expected).long())
    test = FolderDataset("f", images_dir=root / "images", masks_dir=root / "masks", csv_path=root / "cases.csv",
                         split="test", num_classes=3)
    assert test.cases() == ["patient2", "patient2"]
    # one labelled case; the other training case becomes the unlabelled pool, whole
    labelled = FolderDataset("f", images_dir=root / "images", masks_dir=root / "masks",
                             csv_path=root / "cases.csv", class_train_samples=1, num_classes=3)
    pool = FolderDataset("f", images_dir=root / "images", csv_path=root / "cases.csv", role="unlabelled",
                         class_train_samples=1, masks_dir=root / "masks")
    assert len(labelled) == 2 and len(pool) == 2 and not set(labelled.cases()) & set(pool.cases())
    assert not pool[0]["labelled"]


def test_folder_dataset_palette_masks(tmp_path):
    palette = {0: (0, 0, 0), 1: (255, 0, 0)}
    root = write_folder_dataset(tmp_path / "p", n=3, palette=palette)
    ds = FolderDataset("p", images_dir=root / "images", masks_dir=root / "masks", palette=palette,
                       val_fraction=0, test_fraction=0, num_classes=2)
    assert ds[0]["mask"].max() == 1 and ds[0]["mask"].min() == 0


def test_unlabelled_folder_without_masks(tmp_path):
    root = write_folder_dataset(tmp_path / "u", n=3)
    ds = FolderDataset("u", images_dir=root / "images", role="unlabelled", val_fraction=0, test_fraction=0)
    assert len(ds) == 3 and not ds[2]["labelled"]


def test_flowers_official_format(tmp_path):
    ids = write_flowers(tmp_path / "flowers", classes=[0, 1, 2], per_class=4)
    kw = dict(root=tmp_path / "flowers", train_classes=[0, 1], unanno_classes=[2], num_classes=2)
    labelled = FlowersDataset("fa", class_train_samples=1, **kw)
    # first training image of each train class (class 0: ids 1-4, class 1: ids 5-8)
    assert labelled.ids == [1, 5]
    mask = labelled[0]["mask"]
    assert mask[:16, :16].eq(1).all() and mask[16:].eq(0).all() and mask[:, 16:].eq(0).all()
    pool = FlowersDataset("fu", role="unlabelled", class_train_samples=1, **kw)
    assert pool.ids == [2, 6, 9, 10]  # the other training images of classes 0, 1 and those of class 2
    assert FlowersDataset("fa", split="val", **kw).ids == ids["valid"]
    assert FlowersDataset("fa", split="test", **kw).ids == ids["tstid"]


def test_flowers_style_pool_holds_no_validation_or_test_image(tmp_path):
    ids = write_flowers(tmp_path / "flowers", classes=[0, 1, 2, 3], per_class=6)
    kw = dict(root=tmp_path / "flowers", train_classes=[0, 1], unanno_classes=[2, 3], num_classes=2)
    evaluation = set(ids["valid"]) | set(ids["tstid"])
    for k in (None, 0, 2):
        pool = FlowersDataset("fu", role="unlabelled", class_train_samples=k, **kw)
        labelled = set(FlowersDataset("fa", class_train_samples=k, **kw).ids) if k != 0 else set()
        assert not set(pool.ids) & evaluation
        assert set(pool.ids) | labelled == set(ids["trnid"]) and not set(pool.ids) & labelled
        assert not {pool.load(i).case for i in range(len(pool))} & {f"image_{i:05d}" for i in evaluation}


def test_synthetic_pairs_read_back_with_manifest(tmp_path):
    write_synthetic_pairs(tmp_path / "syn" / "run1", n=3)
    ds = SyntheticPairs("s", root=tmp_path / "syn", folder_name="run1", num_classes=2)
    assert len(ds) == 3
    sample = ds[2]
    check_sample(sample, num_classes=2)
    assert sample["mask"][:2].eq(0).all() and sample["mask"][2:].eq(1).all()
    assert sample["meta"]["layout_case"] == "L2"


def test_registry_entries_mix_in_one_datamodule(compose_cfg, tmp_path):
    write_synthetic_pairs(tmp_path / "data" / "syn_data" / "mine", n=3, size=64)
    cfg = compose_cfg("train_diff", ["data/dataset=[demo_anno,demo_syn]", "data.ratios=[0.25,0.75]",
                                     "data.dataset.demo_syn.folder_name=mine", "data.samples=16"])
    dm = StedmDataModule(cfg.data, batch_size=4, eval_splits=("val",))
    assert dm.epoch_mix() == {"demo_anno": 4, "demo_syn": 12}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].dtype == torch.int64
    assert set(batch["meta"]["source"]) <= {"demo_anno", "demo_syn"}
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[-1] == 128 and val["meta"]["source"] == ["demo_anno"]


def test_style_source_adds_style_images(compose_cfg):
    from hydra.utils import instantiate

    cfg = compose_cfg("train_diff", ["style_sampling=augmented"])
    dm = StedmDataModule(cfg.data, batch_size=2, style_source=instantiate(cfg.style_sampling.source), eval_splits=())
    batch = next(iter(dm.train_dataloader()))
    assert batch["style"].shape == (2, 1, 3, 64, 64)
    assert not torch.equal(batch["style"][:, 0], batch["image"])  # augmented, not a copy


def test_preview_prints_counts_and_writes_a_grid(tmp_path, capsys):
    from PIL import Image

    from stedm.data.preview import main

    out = main([f"location.result_dir={tmp_path}", "data/dataset=[demo_anno,demo_unanno]", "data.ratios=[0.5,1.0]",
                "--rows", "3", "--out", str(tmp_path / "grid.png")])
    printed = capsys.readouterr().out
    assert "demo_anno" in printed and "items=4" in printed and "per epoch=64" in printed
    assert "epoch: 192 items = 33% demo_anno + 67% demo_unanno" in printed
    grid = Image.open(out)
    from stedm.data.preview import TILE
    # image | overlay | mask | one style image; 3 training + 2 val + 2 test rows, 64-px patches enlarged
    assert grid.size[0] > 4 * TILE and grid.size[1] > 7 * TILE
