"""The one offline feature extractor and the feature distances (KID, FD) computed on it.

A torchvision ResNet-18 with random weights drawn from seed 0, stem and two stages, globally
average-pooled (128 features). No pretrained weights exist offline, so these are NOT Inception
FID/KID: numbers compare between rows of one table (the same extractor), never with published
FID/KID. ``benchmarks/sampler_agreement.py`` and ``python -m stedm.qc`` both use this module.
"""

from __future__ import annotations

import torch
from torch import nn


def feature_extractor() -> nn.Module:
    """The fixed, seeded feature extractor: ResNet-18 (random weights from seed 0), stem and two
    stages, global average pooling -> 128 features. Takes [0, 1] float or uint8 images
    (torchmetrics' ``normalize=True``), so it maps them to [-1, 1] first."""
    from torchvision.models import resnet18

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = resnet18(weights=None)

    class Features(nn.Module):
        num_features = 128

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            if images.dtype == torch.uint8:
                images = images.float() / 255
            return self.body(images.float() * 2 - 1).mean(dim=(-2, -1)).double()

    return Features().eval()


def distances(real: torch.Tensor, fake: torch.Tensor, extractor: nn.Module | None = None,
              subset: int | None = None) -> tuple[float, float]:
    """(KID x 1e3, FD) of ``fake`` to ``real`` (both N x 3 x H x W in [-1, 1]) on ``extractor``'s
    features (default :func:`feature_extractor`). KID averages 50 random subsets of ``subset``
    images (default: the smaller set), drawn from seed 0 so every call draws the same subsets."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    extractor = feature_extractor() if extractor is None else extractor
    subset = min(len(real), len(fake)) if subset is None else int(subset)
    if subset < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated images, got {len(real)} and {len(fake)}")
    kid = KernelInceptionDistance(feature=extractor, subsets=50, subset_size=subset, normalize=True)
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    with torch.no_grad():
        for metric in (kid, fid):
            metric.update((real.float() + 1) / 2, real=True)
            metric.update((fake.float() + 1) / 2, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # KID averages over random subsets: the same subsets for every call
        kid_mean = float(kid.compute()[0])
    return 1e3 * kid_mean, float(fid.compute())
