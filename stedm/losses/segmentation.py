"""The STEDM segmentation loss (weighted cross-entropy + Dice) and the border crop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from stedm.data.contract import IGNORE_INDEX


class SegmentationLoss(nn.Module):
    """``ce_weight * CE + dice_weight * Dice`` on softmax logits; ``ignore_index`` pixels count in neither.

    Args:
        ce_weight, dice_weight: the paper uses 0.1 and 0.9.
        ignore_index: mask value of unlabelled pixels.
        dice_classes: classes whose Dice enters the loss. ``"foreground"`` (the paper) = every
            class but 0, resolved from the number of logit channels; ``None`` = all classes;
            or an explicit list of class ids.

    ``forward(logits B x C x H x W, target B x H x W int64) -> scalar``. A batch without any
    labelled pixel gives 0 (with a graph), not ``NaN``, so unlabelled samples may share a batch.
    The Dice term is smp's ``DiceLoss`` (multiclass mode: softmax over classes; a class absent
    from the batch's ground truth contributes 0).
    """

    def __init__(
        self,
        ce_weight: float = 0.1,
        dice_weight: float = 0.9,
        ignore_index: int = IGNORE_INDEX,
        dice_classes: Sequence[int] | str | None = "foreground",
    ) -> None:
        super().__init__()
        if isinstance(dice_classes, str) and dice_classes != "foreground":
            raise ValueError(f"dice_classes must be 'foreground', None or a list of class ids, got '{dice_classes}'")
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.ignore_index = ignore_index
        self.dice_classes = dice_classes
        self.dice = DiceLoss(
            mode="multiclass",
            classes=None if dice_classes is None or isinstance(dice_classes, str) else list(dice_classes),
            ignore_index=ignore_index,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # bf16 logits lose too much in softmax / log-sum-exp
        labelled = (target != self.ignore_index).sum()
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum") / labelled.clamp_min(1)
        if self.dice_classes == "foreground":
            # smp selects classes with a fixed index list; it depends on the channel count.
            self.dice.classes = torch.arange(1, logits.shape[1])
        return self.ce_weight * ce + self.dice_weight * self.dice(logits, target)


def crop_border(tensor: torch.Tensor, pixels: int) -> torch.Tensor:
    """Drop ``pixels`` rows/columns on each side of the last two dimensions.

    The paper crops the tiling overlap of training patches before the loss, so border pixels
    (which lack context) do not drive training.
    """
    if pixels < 0:
        raise ValueError(f"border crop must be >= 0 pixels, got {pixels}")
    if pixels == 0:
        return tensor
    height, width = tensor.shape[-2:]
    if 2 * pixels >= min(height, width):
        raise ValueError(f"border crop of {pixels} px leaves nothing of a {height}x{width} patch; lower border_crop")
    return tensor[..., pixels:-pixels, pixels:-pixels]
