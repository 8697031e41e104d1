"""Layout encoder: the one-hot segmentation layout, brought to latent size, as extra U-Net input channels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class LayoutEncoder(nn.Module):
    """One-hot layout B x num_classes x H x W -> B x out_channels x h x w.

    The layout is bilinearly downsampled to the latent size by repeated halving, as LDM's
    ``SpatialRescaler`` does (each halving averages 2 x 2 pixels, so class boundaries become soft
    fractions instead of being aliased), then mapped by a trainable 1 x 1 convolution without
    bias. The result is concatenated with the noisy latent by the caller.
    """

    def __init__(self, num_classes: int, out_channels: int = 3):
        super().__init__()
        self.channel_mapper = nn.Conv2d(num_classes, out_channels, kernel_size=1, bias=False)

    def forward(self, onehot: Tensor, size: tuple[int, int]) -> Tensor:
        if onehot.ndim != 4 or onehot.shape[1] != self.channel_mapper.in_channels:
            raise ValueError(f"LayoutEncoder expects a one-hot layout B x {self.channel_mapper.in_channels} x H x W, "
                             f"got {tuple(onehot.shape)}; num_classes must match the data")
        size = (int(size[0]), int(size[1]))
        x = onehot.to(self.channel_mapper.weight.dtype)
        while x.shape[-2] >= 2 * size[0] and x.shape[-1] >= 2 * size[1]:
            x = F.interpolate(x, scale_factor=0.5, mode="bilinear")
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear")
        return self.channel_mapper(x)
