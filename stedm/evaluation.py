"""Whole-image evaluation: sliding-window prediction with logit stitching, and the one Evaluator.

The evaluation unit is a whole image (for whole-slide data: an annotated region, with the
slide as its case). Units are predicted window by window, the logits of overlapping windows
are averaged (a smooth weight keeps window borders, which lack context, from dominating), and
every metric is computed on the stitched result - never on overlapping patches.

:class:`Evaluator` keeps one small record per unit (its confusion matrix and, optionally, its
boundary/instance metrics), keyed by ``(source, index)``. Under DDP the records of all ranks are
gathered and de-duplicated before scoring, so each unit counts exactly once even though
Lightning's distributed sampler pads the last batch with repeated units.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from stedm.data.contract import IGNORE_INDEX
from stedm.metrics.instances import unit_spatial_metrics
from stedm.metrics.segmentation import (
    confusion_matrix,
    foreground_counts,
    nanmean,
    scores,
    spread,
    summarize_confusion,
)

METRICS_FILE = "metrics_{tag}.json"
PER_CASE_FILE = "per_case_{tag}.csv"
SPATIAL_METRICS = ("hd", "hd95", "aji", "object_dice")
SUMMARY_KEYS = ("iou_fg", "dice_fg", "case_iou_fg_mean", "case_iou_fg_std", "case_iou_fg_var",
                "subtype_recall_fg_var", "hd95", "aji", "object_dice", "n_units", "n_cases")
"""The metrics printed in the short table at the end of a test run."""

ModelFn = Callable[[torch.Tensor], torch.Tensor]


# -- sliding-window prediction ------------------------------------------------------------------

def window_weight(window: int, weighting: str, device: torch.device | None = None) -> torch.Tensor:
    """``window x window`` blending weight: ``"uniform"`` or ``"gaussian"`` (sigma = window / 8,
    as nnU-Net; strictly positive, so every pixel is covered)."""
    if weighting == "uniform":
        return torch.ones(window, window, device=device)
    if weighting == "gaussian":
        coords = torch.arange(window, device=device, dtype=torch.float64) - (window - 1) / 2
        profile = torch.exp(-0.5 * (coords / (window / 8)) ** 2)
        return torch.outer(profile, profile).float()
    raise ValueError(f"weighting must be 'uniform' or 'gaussian', got '{weighting}'")


def check_window(window: int, overlap: int, margin: int = 0,
                 names: tuple[str, str, str] = ("window", "overlap", "margin")) -> None:
    """Refuse a sliding-window geometry that cannot tile an image; ``names`` are what the message
    calls window, overlap and margin (the config keys a user sets, e.g. ``data.eval_overlap``)."""
    w, o, m = names
    if window <= 0 or not 0 <= overlap < window or margin < 0:
        raise ValueError(f"sliding window needs {w} > 0, 0 <= {o} < {w} and {m} >= 0; got {w}={window}, "
                         f"{o}={overlap}, {m}={margin}: set {o} below {w} (or {w} above {o})")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``0..length``; the last window ends exactly at ``length``."""
    return sorted(set(range(0, length - window, stride)) | {length - window})


def pad_to_window(image: torch.Tensor, window: int, margin: int = 0) -> torch.Tensor:
    """Pad ``B x C x H x W`` by ``margin`` on every side, then bottom/right up to ``window``
    where a side is still shorter (reflection where the image is large enough, else edge
    replication)."""
    height, width = image.shape[-2:]
    pad_h = max(0, window - height - 2 * margin)
    pad_w = max(0, window - width - 2 * margin)
    pads = (margin, margin + pad_w, margin, margin + pad_h)
    if not any(pads):
        return image
    mode = "reflect" if max(pads[:2]) < width and max(pads[2:]) < height else "replicate"
    return F.pad(image, pads, mode=mode)


@torch.no_grad()
def sliding_window_logits(
    model_fn: ModelFn,
    image: torch.Tensor,
    window: int,
    overlap: int,
    num_classes: int,
    weighting: str = "gaussian",
    window_batch_size: int = 8,
    margin: int = 0,
) -> torch.Tensor:
    """Logits ``B x num_classes x H x W`` (float32) of images ``B x 3 x H x W`` of any size.

    ``model_fn`` maps ``N x 3 x window x window`` to ``N x num_classes x window x window``.
    Windows step by ``window - overlap``; the last row/column of windows is shifted to end at
    the image border instead of padding, so (apart from ``margin``) only images smaller than
    ``window`` are padded.
    Overlapping logits are averaged with :func:`window_weight`. At most ``window_batch_size``
    windows go through the model at once. The result lives on ``image``'s device.

    ``margin`` reflect-pads the image on every side before tiling (and crops it off again), so
    no image pixel is predicted by the outermost ``margin`` pixels of a window alone. Set it to
    the training border crop: a network trained with cropped borders never learnt those.
    """
    check_window(window, overlap, margin)
    if image.ndim != 4:
        raise ValueError(f"image must be B x 3 x H x W, got shape {tuple(image.shape)}")
    batch, _, height, width = image.shape
    padded = pad_to_window(image, window, margin)
    full_h, full_w = padded.shape[-2:]
    weight = window_weight(window, weighting, image.device)
    logits = torch.zeros(batch, num_classes, full_h, full_w, device=image.device)
    norm = torch.zeros(full_h, full_w, device=image.device)
    stride = window - overlap
    positions = [(y, x) for y in window_starts(full_h, window, stride) for x in window_starts(full_w, window, stride)]
    per_chunk = max(1, window_batch_size // batch)
    for first in range(0, len(positions), per_chunk):
        chunk = positions[first:first + per_chunk]
        tiles = torch.cat([padded[:, :, y:y + window, x:x + window] for y, x in chunk])
        out = model_fn(tiles)
        if out.shape != (len(tiles), num_classes, window, window):
            raise ValueError(
                f"model returned {tuple(out.shape)} for windows {tuple(tiles.shape)}; expected "
                f"{(len(tiles), num_classes, window, window)} (check num_classes and window)")
        out = out.float().to(image.device).unflatten(0, (len(chunk), batch))
        for (y, x), tile_logits in zip(chunk, out):
            logits[:, :, y:y + window, x:x + window] += tile_logits * weight
            norm[y:y + window, x:x + window] += weight
    return (logits / norm)[:, :, margin:margin + height, margin:margin + width]


# -- metric accumulation ------------------------------------------------------------------------

@dataclass
class UnitRecord:
    """What the Evaluator keeps of one evaluation unit (small, picklable for all-gather)."""

    key: Hashable
    case: str
    subtype: str | None
    confusion: np.ndarray  # C x C int64, rows ground truth
    spatial: dict[str, float] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """Scalar metrics (flat dict) and one row per case."""

    metrics: dict[str, float]
    per_case: list[dict[str, Any]]

    def save(self, output_dir: str | Path, tag: str) -> tuple[Path, Path]:
        """Write ``metrics_{tag}.json`` and ``per_case_{tag}.csv`` (``NaN`` -> JSON ``null``)."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = output_dir / METRICS_FILE.format(tag=tag)
        cases_path = output_dir / PER_CASE_FILE.format(tag=tag)
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.metrics.items()}
        metrics_path.write_text(json.dumps(clean, indent=2) + "\n")
        pd.DataFrame(self.per_case).to_csv(cases_path, index=False)
        return metrics_path, cases_path

    def summary(self) -> str:
        """The headline metrics as a one-row text table."""
        row = {k: self.metrics[k] for k in SUMMARY_KEYS if k in self.metrics}
        return pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.4f}")


class Evaluator:
    """Accumulates whole-image metrics over evaluation units; reusable by any segmenter.

    Args:
        num_classes: number of classes of the masks and logits.
        window, overlap: sliding-window size (the training patch size) and overlap in pixels.
        class_names: names used in per-class metric keys (default ``"0"``, ``"1"``, ...).
        include_background_in_mean: whether class 0 enters the class means.
        spatial_metrics: also compute HD, HD95, AJI and object Dice per unit (CPU cost per
            unit; useful at test time, usually off during validation).
        weighting: window blending, ``"gaussian"`` or ``"uniform"``.
        window_batch_size: windows per forward pass.
        margin: reflect padding around each image before tiling (see
            :func:`sliding_window_logits`; use the training border crop).
        ignore_index: mask value of unlabelled pixels.

    Use :meth:`update` with a model and a contract batch, or :meth:`accumulate` with
    predictions you made yourself; then :meth:`compute` (collective under DDP: every rank must
    call it) and :meth:`reset`.
    """

    def __init__(
        self,
        num_classes: int,
        window: int,
        overlap: int = 0,
        class_names: Sequence[str] | None = None,
        include_background_in_mean: bool = False,
        spatial_metrics: bool = True,
        weighting: str = "gaussian",
        window_batch_size: int = 8,
        margin: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        check_window(window, overlap, margin)  # fail at construction, not after an epoch
        window_weight(1, weighting)
        self.num_classes = num_classes
        self.window = window
        self.overlap = overlap
        self.class_names = list(class_names) if class_names is not None else None
        self.include_background_in_mean = include_background_in_mean
        self.spatial_metrics = spatial_metrics
        self.weighting = weighting
        self.window_batch_size = window_batch_size
        self.margin = margin
        self.ignore_index = ignore_index
        self.units: dict[Hashable, UnitRecord] = {}

    def reset(self) -> None:
        self.units = {}

    def predict(self, model_fn: ModelFn, image: torch.Tensor) -> torch.Tensor:
        """Stitched logits ``B x C x H x W`` of whole images ``B x 3 x H x W``."""
        return sliding_window_logits(model_fn, image, self.window, self.overlap, self.num_classes,
                                     self.weighting, self.window_batch_size, self.margin)

    def update(self, model_fn: ModelFn, batch: dict[str, Any]) -> torch.Tensor:
        """Predict a collated contract batch of whole images, accumulate each, return the logits."""
        logits = self.predict(model_fn, batch["image"])
        meta = batch["meta"]
        for b in range(logits.shape[0]):
            subtype = meta["subtype"][b] if "subtype" in meta else None
            self.accumulate(
                logits[b],
                batch["mask"][b],
                case=str(meta["case"][b]),
                subtype=None if subtype is None else str(subtype),
                instances=batch["instances"][b] if "instances" in batch else None,
                key=(str(meta["source"][b]), int(meta["index"][b])),
            )
        return logits

    def accumulate(
        self,
        prediction: torch.Tensor,
        mask: torch.Tensor,
        case: str,
        subtype: str | None = None,
        instances: torch.Tensor | None = None,
        key: Hashable | None = None,
    ) -> None:
        """Record one unit.

        ``prediction`` is either logits ``C x H x W`` or a class map ``H x W``; ``mask`` is
        ``H x W`` class ids (``ignore_index`` = unlabelled); ``instances`` ``H x W`` ground-truth
        instance ids (0 = background) if known. A unit whose ``key`` was already recorded is
        skipped (padding repeats of distributed samplers); ``key=None`` always records.
        """
        if key is None:
            key = ("unit", dist.get_rank() if _distributed() else 0, len(self.units))
        if key in self.units:
            return
        pred = prediction.argmax(0) if prediction.ndim == 3 else prediction
        if pred.shape != mask.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and mask {tuple(mask.shape)} differ in size")
        confusion = confusion_matrix(pred, mask, self.num_classes, self.ignore_index).cpu().numpy()
        spatial = {}
        if self.spatial_metrics:
            spatial = unit_spatial_metrics(
                pred.cpu().numpy(), mask.cpu().numpy(),
                None if instances is None else instances.cpu().numpy(), self.ignore_index)
        self.units[key] = UnitRecord(key, str(case), subtype, confusion, spatial)

    def compute(self) -> EvaluationResult:
        """Metrics over every unit of every rank (each unit once); see :func:`score_units`."""
        return score_units(
            _gather_units(self.units.values()), self.num_classes, self.class_names, self.include_background_in_mean)


def score_units(
    units: Sequence[UnitRecord],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    include_background_in_mean: bool = False,
) -> EvaluationResult:
    """Pooled, per-case, per-subtype and per-unit statistics of a set of units.

    * pooled: :func:`~stedm.metrics.segmentation.summarize_confusion` of the summed matrices;
    * per case: foreground scores of the case's pooled pixels (``case_iou_fg_mean/std/var``,
      ``case_dice_fg_...``; cases with an empty union are ``NaN`` and skipped);
    * per subtype (when units carry one): pooled foreground recall ``recall_fg/subtype/<s>``
      and its variance across subtypes ``subtype_recall_fg_var``;
    * spatial metrics: mean over units with a defined value (``hd``, ``hd95``, ``aji``,
      ``object_dice``), and the same per case.
    """
    empty = np.zeros((num_classes, num_classes), dtype=np.int64)
    total = sum((u.confusion for u in units), empty)
    metrics = summarize_confusion(torch.from_numpy(total), class_names, include_background_in_mean)

    by_case: dict[str, list[UnitRecord]] = defaultdict(list)
    for unit in units:
        by_case[unit.case].append(unit)
    per_case = [_case_row(case, members) for case, members in sorted(by_case.items())]
    metrics.update(spread([row["iou_fg"] for row in per_case], "case_iou_fg"))
    metrics.update(spread([row["dice_fg"] for row in per_case], "case_dice_fg"))

    by_subtype: dict[str, list[UnitRecord]] = defaultdict(list)
    for unit in units:
        if unit.subtype is not None:
            by_subtype[unit.subtype].append(unit)
    if by_subtype:
        recalls = {s: _foreground_scores(members)["recall_fg"] for s, members in sorted(by_subtype.items())}
        metrics.update({f"recall_fg/subtype/{s}": r for s, r in recalls.items()})
        stats = spread(list(recalls.values()), "subtype_recall_fg")
        metrics.update({"subtype_recall_fg_mean": stats["subtype_recall_fg_mean"],
                        "subtype_recall_fg_var": stats["subtype_recall_fg_var"]})

    if any(u.spatial for u in units):
        for name in SPATIAL_METRICS:
            metrics[name] = nanmean([u.spatial[name] for u in units])
    metrics["n_units"] = len(units)
    metrics["n_cases"] = len(per_case)
    return EvaluationResult(metrics, per_case)


def _foreground_scores(units: Iterable[UnitRecord]) -> dict[str, float]:
    confusion = torch.from_numpy(sum(u.confusion for u in units)).double()
    counts = foreground_counts(confusion)
    out = {f"{name}_fg": float(v) for name, v in scores(*counts).items() if name != "accuracy"}
    out.update(tp=int(counts[0]), fp=int(counts[1]), fn=int(counts[2]))
    return out


def _case_row(case: str, units: list[UnitRecord]) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case}
    subtypes = sorted({u.subtype for u in units if u.subtype is not None})
    if subtypes:
        row["subtype"] = "|".join(subtypes)
    row["n_units"] = len(units)
    row.update(_foreground_scores(units))
    if any(u.spatial for u in units):
        row.update({name: nanmean([u.spatial[name] for u in units]) for name in SPATIAL_METRICS})
    return row


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_units(units: Iterable[UnitRecord]) -> list[UnitRecord]:
    """Every rank's records, first occurrence of each key kept (identical units repeat)."""
    local = list(units)
    if not _distributed():
        return local
    parts: list[list[UnitRecord] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[Hashable, UnitRecord] = {}
    for part in parts:
        for unit in part or []:
            merged.setdefault(unit.key, unit)
    return list(merged.values())
