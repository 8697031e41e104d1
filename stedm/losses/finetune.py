"""Fine-tuning losses of GenSelfDiff-HIS (docs/method.md, 2 GenSelfDiff-HIS): softmax focal loss + "structural similarity" loss.

Every function takes ``logits`` ``B x C x H x W`` (any float dtype; computed in float32) and
``target`` ``B x H x W`` int64 class ids, where ``ignore_index`` pixels count nowhere. All terms
are means over pixels (not sums), so their scale does not depend on batch or image size. Logs of
probabilities come from ``log_softmax`` (via ``cross_entropy``), never ``log(softmax)``, so a
probability that underflows to 0 gives a large finite loss instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from stedm.data.contract import IGNORE_INDEX


def _valid_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``valid`` elements; 0 (still attached to the graph) when none is valid."""
    return (values * valid).sum() / valid.sum().clamp_min(1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Softmax focal loss ``-(1 - p_t)^γ log p_t`` averaged over the non-ignored pixels.

    ``p_t`` is the softmax probability of the target class (Lin et al., 2017, multi-class form).
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none", ignore_index=ignore_index)
    modulation = (1.0 - torch.exp(-ce)).clamp_min(0.0) ** gamma
    return _valid_mean(modulation * ce, target != ignore_index)


def _standardise(maps: torch.Tensor, valid: torch.Tensor, c: float) -> torch.Tensor:
    """``(x - μ + c) / (σ + c)`` with μ, σ (population std) over the valid pixels of each map."""
    count = valid.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    mean = (maps * valid).sum(dim=(2, 3), keepdim=True) / count
    var = ((maps - mean) ** 2 * valid).sum(dim=(2, 3), keepdim=True) / count
    # clamp: sqrt has an infinite gradient at 0 (constant maps, e.g. saturated softmax)
    return (maps - mean + c) / (var.clamp_min(1e-12).sqrt() + c)


def structural_similarity_loss(logits: torch.Tensor, target: torch.Tensor, beta: float = 0.1, c: float = 0.01,
                               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The "structural similarity" (SS) loss of GenSelfDiff-HIS.

    For every image ``b`` and class ``k``, the one-hot target map ``y`` and the softmax map ``p``
    are standardised over the image's valid pixels, ``s(x) = (x - μ + C) / (σ + C)`` (population
    std, ``C = c``); ``e = |s(y) - s(p)|``. Pixels with ``e > β · max(e)`` (the max over the
    valid pixels of that image and class) are selected; at a selected ``(b, k, pixel)`` the loss
    is ``e · CE`` where ``CE = -log p_target(pixel)`` is the ordinary per-pixel cross-entropy of
    the prediction against the target (the same for every class ``k`` of that pixel). The result
    is the mean over all selected ``(b, k, pixel)`` triples (0 if none is selected).
    Gradients flow through both ``e`` and ``CE``; the selection itself is a hard threshold.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    valid = target != ignore_index
    safe_target = target.masked_fill(~valid, 0)
    ce = F.cross_entropy(logits, safe_target, reduction="none")
    onehot = F.one_hot(safe_target, num_classes).permute(0, 3, 1, 2).float()
    valid_maps = valid[:, None].float()
    e = (_standardise(onehot, valid_maps, c) - _standardise(logits.softmax(dim=1), valid_maps, c)).abs() * valid_maps
    selected = (e > beta * e.detach().amax(dim=(2, 3), keepdim=True)) & valid[:, None]
    return _valid_mean(e * ce[:, None], selected)


class FocalSSLoss(nn.Module):
    """``focal_weight · focal + ss_weight · SS (+ dice_weight · Dice)``; ``forward(logits, target) -> scalar``.

    The paper weights focal and SS 1 : 1 with no Dice term. Dice is smp's multi-class soft Dice
    (computed only when ``dice_weight > 0``). :meth:`terms` returns the unweighted parts for logging.
    """

    def __init__(self, focal_weight: float = 1.0, ss_weight: float = 1.0, dice_weight: float = 0.0,
                 focal_gamma: float = 2.0, ss_beta: float = 0.1, ss_c: float = 0.01,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if focal_weight <= 0 and ss_weight <= 0 and dice_weight <= 0:
            raise ValueError("FocalSSLoss: at least one of focal_weight, ss_weight, dice_weight must be > 0")
        self.weights = {"focal": focal_weight, "ss": ss_weight, "dice": dice_weight}
        self.focal_gamma, self.ss_beta, self.ss_c = focal_gamma, ss_beta, ss_c
        self.ignore_index = ignore_index
        self.dice = DiceLoss("multiclass", from_logits=True, ignore_index=ignore_index) if dice_weight > 0 else None

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted loss terms whose weight is non-zero."""
        if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"expected logits BxCxHxW and target BxHxW, got {tuple(logits.shape)} and {tuple(target.shape)}")
        terms = {}
        if self.weights["focal"]:
            terms["focal"] = focal_loss(logits, target, self.focal_gamma, self.ignore_index)
        if self.weights["ss"]:
            terms["ss"] = structural_similarity_loss(logits, target, self.ss_beta, self.ss_c, self.ignore_index)
        if self.dice is not None:
            terms["dice"] = self.dice(logits.float(), target)
        return terms

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in self.terms(logits, target).items())
