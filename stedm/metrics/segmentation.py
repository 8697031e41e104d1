"""Confusion-matrix segmentation metrics and their spread across cases.

Every score here derives from a ``C x C`` confusion matrix (rows: ground truth, columns:
prediction) so that scores pool correctly over any set of evaluation units: sum the matrices,
then score. The matrix is counted by torchmetrics, the scores by ``smp.metrics``.

Conventions (each is tested in ``tests/test_metrics.py``):

* Pixels whose ground truth is :data:`~stedm.data.contract.IGNORE_INDEX` count nowhere.
* A score whose denominator is zero is ``NaN`` - e.g. the IoU of a class absent from both the
  ground truth and the prediction. "Empty vs. empty" carries no information, so it is neither
  a perfect score (the original's choice, which inflates results) nor a failure. ``NaN``
  scores are skipped by every mean and spread. An empty ground truth with a non-empty
  prediction scores 0.
* "Foreground" is every class except 0 taken together (background vs. any foreground; with
  two classes it is class 1). Foreground scores do not care which foreground class is hit.
* Class means exclude the background (class 0) unless asked to include it.
* Spread across cases uses the population standard deviation / variance (``ddof=0``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import segmentation_models_pytorch.metrics as smp_metrics
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from stedm.data.contract import IGNORE_INDEX

SCORES = {
    "iou": smp_metrics.iou_score,
    "dice": smp_metrics.f1_score,
    "precision": smp_metrics.precision,
    "recall": smp_metrics.recall,
    "accuracy": smp_metrics.accuracy,
}
"""Score name -> ``smp.metrics`` function of ``(tp, fp, fn, tn)``. ``accuracy`` is the
one-vs-rest pixel accuracy of a class, ``(tp + tn) / N``."""


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Count ``C x C`` pixel pairs (row: ground truth, column: prediction) as ``int64``.

    ``pred`` and ``target`` are class-id tensors of the same shape; ground-truth pixels equal to
    ``ignore_index`` are skipped.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    labelled = target != ignore_index
    bad_target = target[labelled & ((target < 0) | (target >= num_classes))]
    if bad_target.numel():
        raise ValueError(
            f"target has class ids {sorted(set(bad_target.tolist()))} outside 0..{num_classes - 1} "
            f"(and not ignore_index={ignore_index}); check the masks or num_classes")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"pred has class ids outside 0..{num_classes - 1}")
    return multiclass_confusion_matrix(
        pred, target, num_classes, ignore_index=ignore_index, validate_args=False).long()


def class_counts(confusion: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-class one-vs-rest ``(tp, fp, fn, tn)`` vectors of a confusion matrix."""
    tp = confusion.diagonal()
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    tn = confusion.sum() - tp - fp - fn
    return tp, fp, fn, tn


def foreground_counts(confusion: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(tp, fp, fn, tn)`` of background (class 0) vs. any foreground class."""
    tp = confusion[1:, 1:].sum()
    fp = confusion[0, 1:].sum()
    fn = confusion[1:, 0].sum()
    tn = confusion[0, 0]
    return tp, fp, fn, tn


def scores(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, tn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score of :data:`SCORES`, element-wise, ``NaN`` where undefined."""
    return {
        name: score(tp, fp, fn, tn, reduction="none", zero_division=math.nan)
        for name, score in SCORES.items()
    }


def summarize_confusion(
    confusion: torch.Tensor,
    class_names: Sequence[str] | None = None,
    include_background_in_mean: bool = False,
) -> dict[str, float]:
    """Pooled scores of a confusion matrix as a flat dict of floats.

    Keys: ``<score>/<class name>`` per class, ``<score>_mean`` over classes (``NaN`` skipped,
    background excluded unless ``include_background_in_mean``), ``<score>_fg`` for
    background vs. foreground, and ``pixel_accuracy`` (fraction of labelled pixels with the
    right class).
    """
    confusion = confusion.double()
    num_classes = confusion.shape[0]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for {num_classes} classes")
    first = 0 if include_background_in_mean else 1
    out: dict[str, float] = {}
    for name, values in scores(*class_counts(confusion)).items():
        out.update({f"{name}/{cls}": float(v) for cls, v in zip(names, values)})
        out[f"{name}_mean"] = nanmean(values[first:].tolist())
    for name, value in scores(*foreground_counts(confusion)).items():
        if name != "accuracy":  # background-vs-foreground accuracy duplicates pixel_accuracy for 2 classes
            out[f"{name}_fg"] = float(value)
    total = confusion.sum()
    out["pixel_accuracy"] = float(confusion.trace() / total) if total > 0 else math.nan
    return out


def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-``NaN`` values; ``NaN`` if there are none (without numpy's warning)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def spread(values: Sequence[float], prefix: str) -> dict[str, float]:
    """``{prefix}_mean``, ``_std``, ``_var`` (population, ``ddof=0``) of the non-``NaN`` values."""
    kept = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if kept.size == 0:
        return {f"{prefix}_mean": math.nan, f"{prefix}_std": math.nan, f"{prefix}_var": math.nan}
    return {f"{prefix}_mean": float(kept.mean()), f"{prefix}_std": float(kept.std()), f"{prefix}_var": float(kept.var())}
