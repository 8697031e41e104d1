"""metrics.csv keeps every attempt's rows, also when a kill lands in the middle of a write."""

from __future__ import annotations

import csv

import pytest

from stedm.logs import AppendingExperimentWriter


def rows(log_dir) -> list[dict]:
    with open(log_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def first_attempt(log_dir) -> None:
    writer = AppendingExperimentWriter(str(log_dir))
    for step in range(3):
        writer.log_metrics({"train/loss_step": 1.0 / (step + 1)}, step)
    writer.save()


def test_a_kill_while_a_new_column_rewrites_the_log_keeps_the_earlier_rows(tmp_path, monkeypatch):
    """A new column (the first validation metric) makes the writer rewrite the whole file; killed
    there (at the epoch-end checkpoint, when a preempted job is stopped), the rows stay."""
    first_attempt(tmp_path)
    before = (tmp_path / "metrics.csv").read_bytes()
    writer = AppendingExperimentWriter(str(tmp_path))
    writer.log_metrics({"val/iou_fg": 0.5}, 3)

    def killed(self, rows):  # the process dies after the header, before the rows
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.save()
    monkeypatch.undo()
    assert (tmp_path / "metrics.csv").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary left behind

    resumed = AppendingExperimentWriter(str(tmp_path))
    resumed.log_metrics({"train/loss_step": 0.2, "val/iou_fg": 0.6}, 3)
    resumed.save()
    log = rows(tmp_path)
    assert [(r["attempt"], r["step"]) for r in log] == [("1", "0"), ("1", "1"), ("1", "2"), ("2", "3")]
    assert log[-1]["val/iou_fg"] == "0.6" and log[0]["val/iou_fg"] == ""


def test_a_row_cut_off_by_a_kill_is_dropped_when_the_run_resumes(tmp_path):
    first_attempt(tmp_path)
    with open(tmp_path / "metrics.csv", "a") as fh:
        fh.write("1,0.0")  # half a row: the kill came mid-append
    resumed = AppendingExperimentWriter(str(tmp_path))
    assert resumed.attempt == 2
    resumed.log_metrics({"train/loss_step": 0.1}, 3)
    resumed.save()
    assert [(r["attempt"], r["step"], r["train/loss_step"]) for r in rows(tmp_path)] == [
        ("1", "0", "1.0"), ("1", "1", "0.5"), ("1", "2", "0.3333333333333333"), ("2", "3", "0.1")]
