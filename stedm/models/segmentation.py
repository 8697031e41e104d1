"""Segmentation networks for stage 3 come from segmentation-models-pytorch, built offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn


def smp_model(arch: str = "Unet", encoder_name: str = "mit_b2", classes: int = 2,
              encoder_weights_path: str | None = None, **kwargs: Any) -> nn.Module:
    """An smp network with random init (smp's default ``imagenet`` would download at run time).

    ``encoder_weights_path``: a local state dict (or a Lightning/torch checkpoint holding one
    under ``state_dict``) for the encoder, e.g. ImageNet weights fetched once by hand.
    """
    model = smp.create_model(arch, encoder_name=encoder_name, encoder_weights=None, classes=classes, **kwargs)
    if encoder_weights_path:
        path = Path(encoder_weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"encoder_weights_path={path}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
        if len(missing) == len(model.encoder.state_dict()):
            raise ValueError(f"{path} holds no weights of a {encoder_name} encoder "
                             f"(first unexpected keys: {unexpected[:3]})")
    return model
