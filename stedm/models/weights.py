"""Reading pretrained weights from local files (nothing is ever downloaded)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path, argument: str = "weights_path") -> dict[str, Tensor]:
    """Read a state dict from a local ``.safetensors``, ``.pt``/``.pth``/``.bin`` or Lightning ``.ckpt`` file.

    A Lightning checkpoint's ``state_dict`` entry is returned; any other file must hold the state
    dict itself. ``argument`` names the config entry the path came from, for error messages.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{argument}={str(path)!r}: no such file; give the local path of a weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Checkpoints of the original LDM release pickle Lightning/OmegaConf objects next to the
        # weights; the user named this file explicitly, so it is treated as trusted.
        log.warning("%s=%s holds non-tensor Python objects; unpickling it fully (only load files you trust)",
                    argument, path)
        payload = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise ValueError(f"{argument}={str(path)!r} does not contain a state dict (name -> tensor)")
    return payload


def load_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str,
                allowed_missing: tuple[str, ...] = ()) -> list[str]:
    """Load ``state_dict`` into ``module``; every parameter must match except missing keys that start
    with one of ``allowed_missing`` (left at their initialisation). Returns those missing keys."""
    own = module.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = module.load_state_dict(
        {k: v for k, v in state_dict.items() if k not in own or own[k].shape == v.shape}, strict=False)
    left_missing = [k for k in missing if not k.startswith(allowed_missing)] if allowed_missing else list(missing)
    if mismatched or unexpected or left_missing:
        problems = [f"shape mismatch: {', '.join(mismatched[:5])}" if mismatched else "",
                    f"missing: {', '.join(left_missing[:5])}" if left_missing else "",
                    f"unexpected: {', '.join(unexpected[:5])}" if unexpected else ""]
        raise ValueError(f"{source} does not fit {type(module).__name__} ("
                         + "; ".join(p for p in problems if p) + "); check the architecture settings")
    return [k for k in missing if k not in left_missing]
