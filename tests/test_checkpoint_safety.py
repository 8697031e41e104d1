"""A damaged latest checkpoint costs at most the work since the one before it, never the run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import compose_in
from stedm.resume import LAST, PREVIOUS, check_run_start
from stedm.tasks.segmentation import train_segmentation

# demo: batch 4, 16 samples -> 4 steps per epoch; only epoch-end checkpoints
RUN = ["preset=tiny", "data.patch_size=32", "data.samples=16", "trainer.enable_progress_bar=false",
       "test_checkpoints=[]", "location.precision=32-true", "checkpoint.every_n_train_steps=null"]


def checkpoints(cfg) -> Path:
    return Path(cfg.location.result_dir) / "checkpoints" / cfg.run_name


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    cfg = compose_in(tmp_path / "run", "train_seg", [*RUN, "trainer.max_epochs=2"])
    train_segmentation(cfg)
    folder = checkpoints(cfg)
    steps = {name: torch.load(folder / name, weights_only=True)["global_step"] for name in (LAST, PREVIOUS)}
    assert steps == {LAST: 8, PREVIOUS: 4}  # the previous last.ckpt is kept until its successor is verified
    truncate(folder / LAST)

    longer = compose_in(tmp_path / "run", "train_seg", [*RUN, "trainer.max_epochs=3"])
    with caplog.at_level(logging.WARNING):
        start = check_run_start(longer)
    assert start.checkpoint == folder / PREVIOUS
    assert str(folder / LAST) in start.note and str(folder / PREVIOUS) in start.note
    train_segmentation(longer)
    assert any(str(folder / PREVIOUS) in r.getMessage() and str(folder / LAST) in r.getMessage()
               for r in caplog.records)

    reference = compose_in(tmp_path / "reference", "train_seg", [*RUN, "trainer.max_epochs=3"])
    train_segmentation(reference)
    resumed, expected = (torch.load(checkpoints(c) / LAST, weights_only=True) for c in (longer, reference))
    assert resumed["global_step"] == expected["global_step"] == 12
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in expected["state_dict"].items())


def test_a_failed_resume_deletes_nothing(tmp_path):
    cfg = compose_in(tmp_path, "train_seg", [*RUN, "trainer.max_epochs=2"])
    train_segmentation(cfg)
    run = Path(cfg.location.result_dir) / "runs" / "train_seg" / cfg.run_name
    log = (run / "logs" / "metrics.csv").read_bytes()
    for name in (LAST, PREVIOUS):
        truncate(checkpoints(cfg) / name)
    with pytest.raises(RuntimeError, match=rf"(?s)no checkpoint of this run can be read.*{LAST}.*{PREVIOUS}"):
        train_segmentation(compose_in(tmp_path, "train_seg", [*RUN, "trainer.max_epochs=3"]))
    assert (run / "logs" / "metrics.csv").read_bytes() == log
    assert {p.name for p in checkpoints(cfg).iterdir()} >= {LAST, PREVIOUS}


def test_an_unwritable_result_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the result folder should be")
    cfg = compose_in(tmp_path, "train_seg", RUN)
    with pytest.raises(PermissionError, match=r"cannot be written.*location.result_dir"):
        check_run_start(cfg)
