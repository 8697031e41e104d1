"""GlaS and MoNuSeg read from fixtures written in the official on-disk formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histology_fixtures import RECTANGLE, TRIANGLE, glas_instances, write_glas, write_monuseg, write_monuseg_xml
from stedm.data.contract import IGNORE_INDEX, check_sample
from stedm.data.datasets.glas import GlasDataset
from stedm.data.datasets.monuseg import MoNuSegDataset, rasterise_instances, read_xml_polygons


@pytest.fixture
def glas_root(tmp_path):
    counts = write_glas(tmp_path / "glas")
    return tmp_path / "glas", counts


def names(dataset):
    return [dataset.load(i).case for i in range(len(dataset))]


def test_glas_splits_are_seeded_disjoint_nested_and_naturally_sorted(glas_root):
    root, _ = glas_root
    kwargs = dict(root=root, val_fraction=0.2, seed=3)
    val = names(GlasDataset(split="val", **kwargs))
    two = names(GlasDataset(split="train", class_train_samples=2, **kwargs))
    four = names(GlasDataset(split="train", class_train_samples=4, **kwargs))
    unlabelled = names(GlasDataset(role="unlabelled", split="train", class_train_samples=4, **kwargs))
    assert len(val) == round(0.2 * 11) and len(two) == 2 and len(four) == 4
    assert set(two) <= set(four) and not set(four) & set(val)
    assert sorted(set(four) | set(unlabelled)) == sorted(f"train_{i}" for i in range(1, 12))
    assert not set(four) & set(unlabelled) and set(val) <= set(unlabelled)
    everything = names(GlasDataset(split="train", class_train_samples=None, **kwargs))
    assert everything == sorted(everything, key=lambda n: int(n.split("_")[1]))  # train_2 before train_10
    assert len(everything) == 11 - len(val)
    assert names(GlasDataset(split="val", **kwargs)) == val  # same seed, same split
    assert names(GlasDataset(split="val", **{**kwargs, "seed": 4})) != val
    pool = names(GlasDataset(role="unlabelled", split="train", class_train_samples=0, **kwargs))
    assert len(pool) == 11  # the SSL pretraining pool: every official training image
    assert names(GlasDataset(root=root, split="test")) == ["testA_1", "testA_2", "testB_1"]
    assert names(GlasDataset(root=root, split="test", test_parts=["testB"])) == ["testB_1"]


def test_glas_samples_have_masks_and_instances(glas_root):
    root, counts = glas_root
    dataset = GlasDataset(root=root, split="test")
    for i in range(len(dataset)):
        sample = dataset[i]
        check_sample(sample, num_classes=2)
        case = sample["meta"]["case"]
        expected = torch.from_numpy(glas_instances(16, 24, counts[case]).astype(np.int64))
        assert torch.equal(sample["instances"], expected)
        assert torch.equal(sample["mask"], (expected > 0).long())
        assert len(sample["instances"].unique()) - 1 == counts[case]
        assert sample["labelled"] and sample["image"].shape == (3, 16, 24)


def test_glas_unlabelled_samples_carry_no_labels(glas_root):
    root, _ = glas_root
    sample = GlasDataset(root=root, role="unlabelled", split="train", class_train_samples=0)[0]
    check_sample(sample)
    assert not sample["labelled"] and (sample["mask"] == IGNORE_INDEX).all() and "instances" not in sample


def test_glas_bad_input_is_refused_with_a_clear_message(glas_root, tmp_path):
    root, _ = glas_root
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GlasDataset(root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="class_train_samples=20"):
        GlasDataset(root=root, class_train_samples=20)
    with pytest.raises(ValueError, match="is empty"):
        GlasDataset(root=root, class_train_samples=0)
    with pytest.raises(ValueError, match="only for split 'train'"):
        GlasDataset(root=root, role="unlabelled", split="val")
    with pytest.raises(ValueError, match="role must be one of"):
        GlasDataset(root=root, role="weak")
    (root / "train_3_anno.bmp").unlink()
    with pytest.raises(ValueError, match=r"without annotation: \['train_3.bmp'\]"):
        GlasDataset(root=root)


def test_xml_rasteriser_matches_hand_counted_polygons(tmp_path):
    # Pixel (row, col) is centred at (col + 0.5, row + 0.5); a centre on a left/top edge is inside,
    # on a right/bottom edge outside (stedm.data.rasterise).
    path = tmp_path / "a.xml"
    write_monuseg_xml(path, [RECTANGLE, TRIANGLE])
    instances = rasterise_instances(read_xml_polygons(path), (24, 24))
    rectangle = np.zeros((24, 24), bool)
    rectangle[2:4, 1:5] = True  # centres x in [1.5, 5.5): columns 1..4; y in [2.5, 4.5): rows 2..3
    assert np.array_equal(instances == 1, rectangle)
    ys, xs = np.nonzero(instances == 2)  # the left and top edges run through centres: 10 + 9 + ... + 1
    assert len(ys) == 55 and (xs >= 10).all() and (ys >= 10).all() and (xs + ys <= 29).all()
    # overlap: the later region wins; a region beyond the border is cut off
    overlap = rasterise_instances([np.array(RECTANGLE), np.array([(3.5, 0.5), (30.0, 0.5), (30.0, 3.5), (3.5, 3.5)])],
                                  (24, 24))
    assert overlap[2, 3] == 2 and overlap[2, 1] == 1 and overlap[3, 3] == 1
    assert (overlap == 2).sum() == 3 * (24 - 3)


def test_monuseg_loads_official_layout(tmp_path):
    root = tmp_path / "monuseg"
    polygons = write_monuseg(root, train_dir="MoNuSeg 2018 Training Data", test_dir="MoNuSegTestData")
    kwargs = dict(root=root, train_dir="MoNuSeg 2018 Training Data", test_dir="MoNuSegTestData", val_fraction=0.0)
    train = MoNuSegDataset(split="train", **kwargs)
    test = MoNuSegDataset(split="test", **kwargs)
    assert len(train) == 3 and len(test) == 1 and test.load(0).case == "TCGA-03-0001"
    for dataset, offset in ((train, 0), (test, 3)):
        for i in range(len(dataset)):
            sample = dataset[i]
            check_sample(sample, num_classes=2)
            assert len(sample["instances"].unique()) - 1 == len(polygons[offset + i])
            assert torch.equal(sample["mask"], (sample["instances"] > 0).long())
    assert (train[1]["instances"] == 2).sum() == 55  # the triangle
    unlabelled = MoNuSegDataset(role="unlabelled", split="train", class_train_samples=1, **kwargs)
    assert len(unlabelled) == 2 and not unlabelled[0]["labelled"]


def test_monuseg_bad_layout_is_refused(tmp_path):
    root = tmp_path / "monuseg"
    write_monuseg(root)
    with pytest.raises(FileNotFoundError, match="MoNuSeg 2018 Training Data"):
        MoNuSegDataset(root=root, train_dir="MoNuSeg 2018 Training Data")
    (root / "train" / "Annotations" / "TCGA-01-0001.xml").unlink()
    with pytest.raises(ValueError, match=r"without annotation: \['TCGA-01-0001.tif'\]"):
        MoNuSegDataset(root=root)
    bad = root / "test" / "TCGA-03-0001.xml"
    bad.write_text("<Annotations><Region><Vertices><Vertex X='a' Y='1'/></Vertices></Region></Annotations>")
    with pytest.raises(ValueError, match="Vertex without numeric"):
        MoNuSegDataset(root=root, split="test")[0]


def draw_frequency(dm) -> dict[str, float]:
    """Expected draws per epoch of every image of the DataModule's training stream."""
    frequency: dict[str, float] = {}
    for dataset, count in zip(dm.train_sets, dm.epoch_mix().values()):
        for case in dataset.cases():
            frequency[case] = frequency.get(case, 0.0) + count / len(dataset)
    return frequency


@pytest.mark.parametrize("data, writer, names", [
    ("glas", write_glas, [f"train_{i}" for i in range(1, 12)]),
    ("monuseg", write_monuseg, ["TCGA-00-0001", "TCGA-01-0001", "TCGA-02-0001"]),
])
@pytest.mark.parametrize("labelled", [None, 2])
def test_pretraining_draws_every_official_training_image_equally_often(compose_cfg, tmp_path, data, writer,
                                                                        names, labelled):
    from stedm.data.datamodule import StedmDataModule

    writer(tmp_path / "data" / data)
    cfg = compose_cfg("pretrain_ssl", [f"data={data}", f"data.class_train_samples={labelled or 'null'}",
                                       "data.patch_size=8", "data.samples=66"])
    dm = StedmDataModule(cfg.data, batch_size=2, eval_splits=())
    frequency = draw_frequency(dm)
    assert sorted(frequency) == sorted(names)
    assert max(frequency.values()) - min(frequency.values()) < 1e-9, frequency
