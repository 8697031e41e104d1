"""The CSV log of a run, kept across resumes.

Lightning's CSV logger deletes ``metrics.csv`` when it finds one (a resumed run, or one whose
resume then failed, lost its history). :class:`AppendingCSVLogger` appends instead, and tags
every row with the ``attempt`` that wrote it (1 for the first start, 2 after the first resume,
...): rows logged after the checkpoint an attempt continued from appear once per attempt that
trained that step; keep the last ``attempt`` of each ``step`` for the history that led to the
final weights.

A kill never costs the history: Lightning rewrites the whole file when a new column appears
(truncating it first); here the rewrite goes to a temporary that replaces the file once complete
(:func:`stedm.fileio.atomic_path`), and a row cut off by a kill mid-append is dropped when the
next attempt opens the log.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from stedm.fileio import atomic_path


class AppendingExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.attempt = 1
        if os.path.isfile(self.metrics_file_path):
            _drop_cut_off_row(self.metrics_file_path)
            with open(self.metrics_file_path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.metrics_keys = sorted(reader.fieldnames or [])
                attempts = [int(float(row["attempt"])) for row in reader if row.get("attempt")]
            self.attempt = max(attempts, default=1) + 1

    def _check_log_dir_exists(self) -> None:
        """Keep what is there (Lightning's writer deletes an existing ``metrics.csv`` here)."""

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """Lightning's rewrite (the rows so far under the wider header), but atomic."""
        with open(self.metrics_file_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        self.metrics[-1]["attempt"] = self.attempt


def _drop_cut_off_row(path: str) -> None:
    """Truncate ``path`` after its last complete line (a kill mid-append leaves a partial row)."""
    with open(path, "rb+") as fh:
        content = fh.read()
        if content and not content.endswith(b"\n"):
            fh.truncate(content.rfind(b"\n") + 1)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` grows across resumes (see the module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
