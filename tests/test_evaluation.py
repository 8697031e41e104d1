"""Sliding-window stitching and the Evaluator's pooling, per-case statistics, de-duplication and files."""

import json
import math
import os
import socket

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from stedm.evaluation import Evaluator, sliding_window_logits, window_starts


def copy_model(channels: int = 3) -> nn.Conv2d:
    """1x1 convolution that copies its input channels to its output: logits == image."""
    conv = nn.Conv2d(3, channels, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels, 3)[:, :, None, None])
    return conv


@pytest.mark.parametrize("weighting", ["gaussian", "uniform"])
@pytest.mark.parametrize("size", [(20, 45), (10, 7), (16, 16)])
@pytest.mark.parametrize("margin", [0, 3])
def test_stitching_a_copying_model_returns_the_image(weighting, size, margin):
    image = torch.randn(2, 3, *size)
    calls = []

    def model(tiles):
        calls.append(tuple(tiles.shape))
        return copy_model()(tiles)

    logits = sliding_window_logits(model, image, window=16, overlap=4, num_classes=3,
                                   weighting=weighting, window_batch_size=4, margin=margin)
    torch.testing.assert_close(logits, image)
    assert all(shape[1:] == (3, 16, 16) and shape[0] <= 4 for shape in calls)


def test_window_starts_cover_and_end_at_border():
    assert window_starts(45, 16, 12) == [0, 12, 24, 29]
    assert window_starts(16, 16, 12) == [0]


def test_wrong_model_output_and_window_geometry_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        sliding_window_logits(copy_model(2), torch.zeros(1, 3, 16, 16), 16, 0, num_classes=3)
    with pytest.raises(ValueError, match="overlap < window"):
        sliding_window_logits(copy_model(), torch.zeros(1, 3, 16, 16), 16, 16, num_classes=3)
    with pytest.raises(ValueError, match="overlap < window"):  # at construction, before any training
        Evaluator(num_classes=2, window=16, overlap=20)


def unit(fg_true: int, fg_pred: int, fg_hit: int, size: int = 10):
    """A 1 x size class map pair with a given count of true, predicted and shared foreground."""
    mask = torch.zeros(1, size, dtype=torch.long)
    pred = torch.zeros(1, size, dtype=torch.long)
    mask[0, :fg_true] = 1
    pred[0, fg_true - fg_hit:fg_true - fg_hit + fg_pred] = 1
    return pred, mask


def fill(evaluator: Evaluator, keys=None, only=(0, 1, 2, 3)):
    """Case A: two units (tp 4, fp 0, fn 4 pooled -> IoU 0.5); case B: one unit IoU 1; case C: empty."""
    units = [("A", "x", unit(4, 4, 4)), ("A", "x", unit(4, 0, 0)), ("B", "y", unit(3, 3, 3)), ("C", "y", unit(0, 0, 0))]
    for i in only:
        case, subtype, (pred, mask) = units[i]
        evaluator.accumulate(pred, mask, case=case, subtype=subtype, key=None if keys is None else keys[i])


def test_evaluator_pools_cases_and_subtypes():
    evaluator = Evaluator(num_classes=2, window=8, spatial_metrics=False)
    fill(evaluator)
    result = evaluator.compute()
    m = result.metrics
    assert m["iou_fg"] == pytest.approx(7 / 11)  # pooled: tp 7, fn 4
    # per case: A 0.5, B 1.0, C empty -> NaN, skipped; mean 0.75, population var 0.0625
    assert m["case_iou_fg_mean"] == pytest.approx(0.75)
    assert m["case_iou_fg_var"] == pytest.approx(0.0625)
    assert m["case_iou_fg_std"] == pytest.approx(0.25)
    # recall per subtype: x 4/8, y 3/3 -> variance 0.0625
    assert m["recall_fg/subtype/x"] == pytest.approx(0.5)
    assert m["subtype_recall_fg_var"] == pytest.approx(0.0625)
    assert m["n_units"] == 4 and m["n_cases"] == 3
    rows = {row["case"]: row for row in result.per_case}
    assert rows["A"]["n_units"] == 2 and rows["A"]["iou_fg"] == pytest.approx(0.5)
    assert math.isnan(rows["C"]["iou_fg"])


def test_repeated_unit_counts_once():
    evaluator = Evaluator(num_classes=2, window=8, spatial_metrics=False)
    fill(evaluator, keys=["a", "b", "c", "d"])
    fill(evaluator, keys=["a", "b", "c", "d"])  # a distributed sampler's padding repeats units
    assert evaluator.compute().metrics["n_units"] == 4


def test_update_reads_contract_batches_and_result_files_parse(tmp_path):
    evaluator = Evaluator(num_classes=3, window=8, overlap=2, spatial_metrics=True)
    image = torch.full((1, 3, 12, 10), -1.0)
    image[:, :, 2:6, 2:6] = 1.0
    mask = torch.zeros(1, 12, 10, dtype=torch.long)
    mask[:, 2:6, 2:6] = 2
    batch = {"image": image, "mask": mask, "labelled": torch.tensor([True]),
             "meta": {"source": ["demo"], "case": ["p1"], "index": torch.tensor([0])}}
    # logits favour class 2 where the image is bright, class 0 elsewhere
    logits = evaluator.update(lambda x: torch.cat([-x[:, :1], 0 * x[:, :1], x[:, :1]], 1), batch)
    assert logits.shape == (1, 3, 12, 10)
    result = evaluator.compute()
    assert result.metrics["iou/2"] == 1.0 and math.isnan(result.metrics["iou/1"])
    assert result.metrics["aji"] == 1.0 and result.metrics["hd95"] == 0.0
    metrics_path, cases_path = result.save(tmp_path, "best")
    saved = json.loads(metrics_path.read_text())
    assert saved["iou/1"] is None and saved["iou_fg"] == 1.0
    assert pd.read_csv(cases_path)["case"].tolist() == ["p1"]


def _ddp_worker(rank: int, port: int, out_dir) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    evaluator = Evaluator(num_classes=2, window=8, spatial_metrics=False)
    # rank 0 sees units 0, 1 and (padding) 2; rank 1 sees units 2, 3
    fill(evaluator, keys=["a", "b", "c", "d"], only=(0, 1, 2) if rank == 0 else (2, 3))
    (out_dir / f"{rank}.json").write_text(json.dumps(evaluator.compute().metrics))
    dist.destroy_process_group()


def test_ddp_gathers_every_unit_once(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the imported modules instead of importing them again
    mp.start_processes(_ddp_worker, args=(port, tmp_path), nprocs=2, start_method="fork")
    out = {rank: json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)}
    reference = Evaluator(num_classes=2, window=8, spatial_metrics=False)
    fill(reference)
    expected = reference.compute().metrics
    for rank in (0, 1):
        assert out[rank]["n_units"] == 4
        assert out[rank]["case_iou_fg_mean"] == pytest.approx(expected["case_iou_fg_mean"])
        assert out[rank]["iou_fg"] == pytest.approx(expected["iou_fg"])
