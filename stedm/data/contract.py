"""The sample contract: what every dataset entry yields and every module consumes.

A sample is a ``dict`` with these keys (and nothing else is required):

``image``
    ``float32`` tensor ``3 x H x W`` in ``[-1, 1]``.
``mask``
    ``int64`` tensor ``H x W`` of class ids. Always present: unlabelled samples are filled
    with :data:`IGNORE_INDEX` so labelled and unlabelled samples collate together.
``labelled``
    ``bool``: whether ``mask`` holds a real annotation.
``style`` (only while a style source is active)
    ``float32`` tensor ``n x 3 x H x W`` in ``[-1, 1]``: the style images of this sample.
``instances`` (only for datasets that know object instances, e.g. GlaS, MoNuSeg)
    ``int64`` tensor ``H x W``: 0 = background, 1..K = instance ids.
``meta``
    ``dict`` with at least ``source`` (registry entry name), ``case`` (patient / slide / image
    id, for per-case metrics) and ``index`` (index within the source). Datasets may add keys
    such as ``subtype`` or ``path``; keep values ``str``/``int``/``float`` so they collate.

Pixel ranges are converted in exactly one place: :func:`image_to_tensor` (uint8 -> [-1, 1])
and :func:`tensor_to_image` ([-1, 1] -> uint8).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IGNORE_INDEX = 255
"""Mask value for pixels without annotation (fits the uint8 PNGs masks are stored in)."""

REQUIRED_KEYS = ("image", "mask", "labelled", "meta")
REQUIRED_META = ("source", "case", "index")


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 array -> ``3 x H x W`` float tensor in ``[-1, 1]``; a stack
    ``N x H x W x 3`` -> ``N x 3 x H x W`` (one conversion for a set of style images)."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    channels_first = torch.from_numpy(np.ascontiguousarray(image[..., :3])).movedim(-1, -3)
    # one pass: uint8 -> float32 straight into the contiguous layout, then scale in place
    tensor = torch.empty(channels_first.shape, dtype=torch.float32).copy_(channels_first)
    return tensor.div_(127.5).sub_(1.0)


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """``3 x H x W`` (or ``B x 3 x H x W``) tensor in ``[-1, 1]`` -> uint8 ``H x W x 3`` array(s).

    Values outside ``[-1, 1]`` are clipped, as the paper's decoder output is.
    """
    x = tensor.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)
    x = x.movedim(-3, -1)
    return x.cpu().numpy()


def mask_to_tensor(mask: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor:
    """Class-id array -> int64 tensor; ``None`` (unlabelled) -> all :data:`IGNORE_INDEX`."""
    if mask is None:
        return torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    return torch.from_numpy(np.ascontiguousarray(mask)).to(torch.int64)


def check_sample(sample: dict[str, Any], num_classes: int | None = None) -> None:
    """Raise ``ValueError`` naming what is wrong if ``sample`` breaks the contract."""
    missing = [k for k in REQUIRED_KEYS if k not in sample]
    if missing:
        raise ValueError(f"sample lacks keys {missing}; the contract is in stedm/data/contract.py")
    missing_meta = [k for k in REQUIRED_META if k not in sample["meta"]]
    if missing_meta:
        raise ValueError(f"sample meta lacks keys {missing_meta}")
    image, mask = sample["image"], sample["mask"]
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.float32:
        raise ValueError(f"image must be float32 3xHxW, got {tuple(image.shape)} {image.dtype}")
    if mask.shape != image.shape[1:] or mask.dtype != torch.int64:
        raise ValueError(f"mask must be int64 {tuple(image.shape[1:])}, got {tuple(mask.shape)} {mask.dtype}")
    if num_classes is not None and sample["labelled"]:
        bad = mask[(mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))]
        if bad.numel():
            raise ValueError(
                f"{sample['meta']['source']}[{sample['meta']['index']}]: mask has class ids "
                f"{sorted(set(bad.tolist()))} outside 0..{num_classes - 1}; "
                "fix the mask or data.num_classes")
