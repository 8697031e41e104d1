"""Metrics against values computed by hand on tiny masks, including every empty-mask convention."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.segmentation import (
    hausdorff_distance as torchmetrics_hausdorff,
)

from stedm.data.contract import IGNORE_INDEX
from stedm.metrics.instances import (
    aggregated_jaccard_index,
    boundary,
    hausdorff_distance,
    instances_from_classes,
    object_dice,
    unit_spatial_metrics,
)
from stedm.metrics.segmentation import confusion_matrix, spread, summarize_confusion


def square(shape, top, left, size, value=1):
    out = np.zeros(shape, dtype=np.int64)
    out[top:top + size, left:left + size] = value
    return out


# -- confusion-matrix metrics ------------------------------------------------------------------

def test_confusion_matrix_skips_ignored_pixels_and_rejects_unknown_ids():
    target = torch.tensor([[0, 1, 2], [IGNORE_INDEX, 1, 1]])
    pred = torch.tensor([[0, 2, 2], [1, 1, 0]])
    expected = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 1]])  # rows: ground truth
    assert torch.equal(confusion_matrix(pred, target, 3), expected)
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(pred, torch.tensor([[0, 1, 7], [0, 0, 0]]), 3)


def test_scores_match_hand_computation():
    # 3 classes; rows ground truth, columns prediction.
    confusion = torch.tensor([[50, 5, 5], [10, 20, 0], [0, 0, 10]])
    out = summarize_confusion(confusion, ["bg", "a", "b"])
    # class a: tp 20, fp 5, fn 10 -> IoU 20/35, Dice 40/55, precision 20/25, recall 20/30
    assert out["iou/a"] == pytest.approx(20 / 35)
    assert out["dice/a"] == pytest.approx(40 / 55)
    assert out["precision/a"] == pytest.approx(20 / 25)
    assert out["recall/a"] == pytest.approx(20 / 30)
    # class b: tp 10, fp 5, fn 0 -> IoU 10/15; one-vs-rest accuracy (10 + 85) / 100
    assert out["iou/b"] == pytest.approx(10 / 15)
    assert out["accuracy/b"] == pytest.approx(95 / 100)
    # background excluded from the mean by default, included on request
    assert out["iou_mean"] == pytest.approx((20 / 35 + 10 / 15) / 2)
    with_bg = summarize_confusion(confusion, ["bg", "a", "b"], include_background_in_mean=True)
    assert with_bg["iou_mean"] == pytest.approx((50 / 70 + 20 / 35 + 10 / 15) / 3)
    # foreground = {a, b}: tp 20 + 10 (class confusions a<->b would count too), fp 10, fn 10
    assert out["iou_fg"] == pytest.approx(30 / 50)
    assert out["pixel_accuracy"] == pytest.approx(80 / 100)


def test_class_absent_from_both_sides_is_nan_and_skipped_in_mean():
    confusion = torch.tensor([[10, 0, 2], [0, 0, 0], [2, 0, 6]])  # class 1 never present nor predicted
    out = summarize_confusion(confusion)
    assert math.isnan(out["iou/1"])
    assert out["iou_mean"] == pytest.approx(6 / 10)
    # absent in ground truth but predicted: a real error, scores 0
    out = summarize_confusion(torch.tensor([[10, 3], [0, 0]]))
    assert out["iou/1"] == 0.0 and out["iou_fg"] == 0.0


def test_empty_set_gives_nan_not_perfect_scores():
    out = summarize_confusion(torch.tensor([[16, 0], [0, 0]]))  # empty vs. empty foreground
    assert math.isnan(out["iou_fg"]) and math.isnan(out["dice_fg"]) and math.isnan(out["iou_mean"])
    assert out["pixel_accuracy"] == 1.0


def test_spread_is_population_statistics_skipping_nan():
    out = spread([0.2, 0.6, math.nan], "x")
    assert out == pytest.approx({"x_mean": 0.4, "x_std": 0.2, "x_var": 0.04})
    assert all(math.isnan(v) for v in spread([math.nan], "x").values())


# -- Hausdorff distances -------------------------------------------------------------------------

def test_boundary_of_square_is_its_outline():
    edge = boundary(square((5, 5), 1, 1, 3))
    assert edge.sum() == 8 and not edge[2, 2]


def test_hausdorff_far_apart_squares_is_large():
    # Same columns, 40 rows apart: a row-wise "Hausdorff" (rows as points) sees identical rows
    # and returns 0. The true boundary distance is 40 pixels.
    target = square((50, 10), 0, 0, 3)
    pred = square((50, 10), 40, 0, 3)
    hd, hd95 = hausdorff_distance(pred > 0, target > 0)
    assert hd == pytest.approx(40.0)
    assert hd95 == pytest.approx(40.0)


def test_hd95_ignores_a_single_outlier_that_sets_hd():
    # 20 isolated boundary pixels shared by both masks, plus one predicted pixel 30 rows away.
    target = np.zeros((40, 40), dtype=bool)
    target[0, 0:40:2] = True
    pred = target.copy()
    pred[30, 0] = True
    hd, hd95 = hausdorff_distance(pred, target)
    assert hd == pytest.approx(30.0)
    # pred->target distances: twenty 0s and one 30; the 95th percentile sits at rank
    # 0.95 * 20 = 19 of the sorted values, still a 0. target->pred: all 0.
    assert hd95 == pytest.approx(0.0)


def test_hausdorff_matches_torchmetrics_on_blobs():
    rng = np.random.default_rng(0)
    pred = rng.random((24, 24)) > 0.7
    target = rng.random((24, 24)) > 0.6
    ours, _ = hausdorff_distance(pred, target)
    reference = torchmetrics_hausdorff(
        torch.from_numpy(pred)[None, None].long(), torch.from_numpy(target)[None, None].long(),
        num_classes=1, include_background=True)
    assert ours == pytest.approx(float(reference))


def random_blobs(rng, shape, clear_border: bool) -> np.ndarray:
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
    mask = noise > 0.3 * noise.std()
    if clear_border:
        mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = False, False, False, False
    return mask


@pytest.mark.parametrize("clear_border", [True, False])
def test_hd_and_hd95_match_monai(clear_border):
    """HD95 = max of the two directed 95th percentiles on 4-neighbour boundaries: MONAI's
    ``compute_hausdorff_distance(percentile=95, directed=False)``, objects touching the border too."""
    import warnings

    from monai.metrics import compute_hausdorff_distance

    def one_hot(mask):
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    rng = np.random.default_rng(1)
    for _ in range(6):
        pred, target = random_blobs(rng, (40, 48), clear_border), random_blobs(rng, (40, 48), clear_border)
        hd, hd95 = hausdorff_distance(pred, target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecated argument
            reference = [float(compute_hausdorff_distance(one_hot(pred), one_hot(target), percentile=p,
                                                          directed=False)) for p in (None, 95)]
        assert (hd, hd95) == pytest.approx(reference, rel=1e-6, abs=1e-5)  # MONAI computes in float32


def test_hausdorff_empty_conventions():
    empty = np.zeros((3, 4), dtype=bool)
    assert all(math.isnan(v) for v in hausdorff_distance(empty, empty))
    # one side empty: the image diagonal, here a 3-4-5 triangle
    assert hausdorff_distance(square((3, 4), 0, 0, 2) > 0, empty) == (5.0, 5.0)


# -- instances -----------------------------------------------------------------------------------

def split_merge_false_positive():
    """Ground truth: G1 4x4 (16 px); G2, G3 2x4 (8 px each) side by side.
    Prediction: G1 split into P1 (4x3, 12 px) and P2 (4x1, 4 px); P3 (2x9, 18 px) merges
    G2 and G3 and the gap between them; P4 (2x2, 4 px) is a false positive."""
    target = np.zeros((12, 12), dtype=np.int64)
    target[0:4, 0:4] = 1
    target[6:8, 0:4] = 2
    target[6:8, 5:9] = 3
    pred = np.zeros((12, 12), dtype=np.int64)
    pred[0:4, 0:3] = 1
    pred[0:4, 3:4] = 2
    pred[6:8, 0:9] = 3
    pred[10:12, 10:12] = 4
    return target, pred


def test_aji_split_merge_false_positive():
    target, pred = split_merge_false_positive()
    # G1 -> P1 (IoU 12/16): C += 12, U += 16
    # G2 -> P3 (IoU 8/18):  C += 8,  U += 18
    # G3 -> P3 (IoU 8/18):  C += 8,  U += 18   (a predicted object may serve several)
    # unpaired P2, P4:               U += 4 + 4
    assert aggregated_jaccard_index(target, pred) == pytest.approx(28 / 60)


def test_object_dice_split_merge_false_positive():
    target, pred = split_merge_false_positive()
    # ground-truth side (weights |G|/32): G1-P1 Dice 24/28, G2-P3 and G3-P3 Dice 16/26
    gt_side = (16 * 24 / 28 + 8 * 16 / 26 + 8 * 16 / 26) / 32
    # predicted side (weights |S|/38): P1-G1 24/28, P2-G1 8/20, P3-G2 16/26, P4 none -> 0
    pred_side = (12 * 24 / 28 + 4 * 8 / 20 + 18 * 16 / 26 + 4 * 0) / 38
    assert object_dice(target, pred) == pytest.approx(0.5 * (gt_side + pred_side))


def test_perfect_instances_and_empty_conventions():
    target, _ = split_merge_false_positive()
    assert aggregated_jaccard_index(target, target) == 1.0
    assert object_dice(target, target) == 1.0
    empty = np.zeros_like(target)
    assert math.isnan(aggregated_jaccard_index(empty, empty)) and math.isnan(object_dice(empty, empty))
    assert aggregated_jaccard_index(target, empty) == 0.0 and aggregated_jaccard_index(empty, target) == 0.0
    assert object_dice(target, empty) == 0.0 and object_dice(empty, target) == 0.0


def test_instances_from_classes_labels_components_per_class():
    class_map = np.array([[1, 1, 0, 1],
                          [0, 0, 0, 1],
                          [2, 1, 0, 0]])
    instances = instances_from_classes(class_map)
    # three class-1 components (diagonal pixels are not connected) and one class-2 component
    assert len(np.unique(instances[instances > 0])) == 4
    assert instances[2, 0] != instances[2, 1]  # adjacent pixels of different classes


def test_unit_spatial_metrics_without_instances_uses_components_and_ignores_unlabelled():
    target = square((12, 12), 0, 0, 4) + square((12, 12), 8, 8, 4)
    pred = square((12, 12), 0, 0, 4)
    out = unit_spatial_metrics(pred, target)
    assert out["aji"] == pytest.approx(16 / 32)  # one object found, the other one missed
    # marking the missed object unlabelled removes it from every metric
    target[8:12, 8:12] = IGNORE_INDEX
    out = unit_spatial_metrics(pred, target)
    assert out == pytest.approx({"hd": 0.0, "hd95": 0.0, "aji": 1.0, "object_dice": 1.0})
    # given instance ids take precedence over components: one object split in two ids
    instances = np.zeros((12, 12), dtype=np.int64)
    instances[0:4, 0:2], instances[0:4, 2:4] = 1, 2
    assert unit_spatial_metrics(pred, target, instances)["aji"] == pytest.approx(16 / 32)
