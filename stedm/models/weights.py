"""Reading pretrained weights from local files (nothing is ever downloaded), without running code.

A ``.pt``/``.ckpt`` file is a pickle, and unpickling can run any code the file names. Weights are
therefore read with ``torch.load(weights_only=True)`` (tensors and plain values only) or from
safetensors; a file that needs more is refused, and converted once, with the user's explicit
consent, by ``python -m stedm.weights convert IN OUT --trust-pickle`` (:func:`convert_weights`).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stedm.fileio import file_digest

CONVERT_COMMAND = "python -m stedm.weights convert {path} {out} --trust-pickle"
NESTED_KEYS = ("state_dict", "model")  # Lightning / LDM release checkpoints, torchvision-style files


class UnsafeFileError(ValueError):
    """A pickle that ``weights_only`` loading refuses: reading it fully could run code."""


def safetensors_ready(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` as safetensors writes them: detached, on the CPU, contiguous, and no two sharing
    memory (safetensors refuses those: the second of a pair is cloned)."""
    seen: set[int] = set()
    ready = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        pointer = tensor.untyped_storage().data_ptr()
        ready[name] = (tensor.clone() if pointer in seen else tensor).contiguous()
        seen.add(pointer)
    return ready


def load_safely(path: str | Path, argument: str, out_suffix: str = ".safetensors") -> Any:
    """``torch.load(path, weights_only=True)``; a file that needs full unpickling is refused with
    an :class:`UnsafeFileError` naming ``argument`` (the config key), the file, and the command
    that converts it (output suffix ``out_suffix``) once the user decides to trust it."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        out = path.with_name(path.stem + ".converted" + out_suffix)
        reason = str(err).splitlines()[-1] if str(err) else type(err).__name__
        raise UnsafeFileError(
            f"{argument}={str(path)!r} holds Python objects besides tensors ({reason}); it is not unpickled, "
            "since that can run code stored in the file. If you trust where it comes from, convert it once: "
            f"{CONVERT_COMMAND.format(path=path, out=out)} and set {argument}={str(out)!r}") from None


def extract_state_dict(payload: Any, source: str) -> dict[str, Tensor]:
    """The state dict in ``payload``: the payload itself, or its ``state_dict``/``model`` entry."""
    for key in NESTED_KEYS:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, Tensor) for v in payload.values()):
        raise ValueError(f"{source} does not contain a state dict (name -> tensor), "
                         f"nor one under {' or '.join(repr(k) for k in NESTED_KEYS)}")
    return payload


def read_state_dict(path: str | Path, argument: str = "weights_path") -> dict[str, Tensor]:
    """Read a state dict from a local ``.safetensors``, ``.pt``/``.pth``/``.bin`` or Lightning ``.ckpt`` file,
    or from the weights cache entry ``path`` names when it is not an existing path.

    A checkpoint's ``state_dict`` (or ``model``) entry is returned; any other file must hold the
    state dict itself. ``argument`` names the config entry the path came from, for error messages.
    A ``.safetensors`` file with a model card beside it (:mod:`stedm.models.cards`) must have the
    sha256 the card records. Never runs code from the file (see the module docstring).
    """
    path = Path(path).expanduser()
    if not path.exists():  # not a path: a name in the weights cache (stedm.weights_cache)
        from stedm.weights_cache import resolve

        path = resolve(str(path), argument)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}={str(path)!r}: no such file; give the local path of a weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from stedm.models.cards import read_card, verify

        card = read_card(path)
        if card is not None:  # written by STEDM (run export, weights cache): the file must be the one it describes
            verify(path, card, argument)
        return load_file(path)
    return extract_state_dict(load_safely(path, argument), f"{argument}={str(path)!r}")


# -- conversion, with the user's consent ---------------------------------------------------------
def plain(value: Any, dropped: list[str], where: str = "") -> Any:
    """``value`` as tensors, numbers, strings and containers only (what ``weights_only`` reads):
    OmegaConf containers become dicts/lists, numpy arrays tensors; anything else is dropped and
    its location appended to ``dropped``."""
    import numpy as np
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            if not isinstance(key, (str, int)):
                dropped.append(f"{name} (key of type {type(key).__name__})")
                continue
            kept = plain(item, dropped, name)
            if kept is not _DROPPED:
                out[key] = kept
        return out
    if isinstance(value, (list, tuple)):
        items = [plain(item, dropped, f"{where}[{i}]") for i, item in enumerate(value)]
        return type(value)(item for item in items if item is not _DROPPED)
    dropped.append(f"{where or '<top>'} ({type(value).__module__}.{type(value).__qualname__})")
    return _DROPPED


_DROPPED = object()


def convert_weights(source: str | Path, target: str | Path, trust_pickle: bool) -> tuple[Path, str, list[str]]:
    """Unpickle ``source`` fully (only because ``trust_pickle`` says the user trusts it) and write
    what can be read safely: ``target.safetensors`` gets the state dict (the file itself, or its
    ``state_dict``/``model`` entry); any other suffix (``.ckpt``/``.pt``) a copy of the whole
    checkpoint with plain values only, readable with ``weights_only=True``. Returns the written
    path, its sha256 and what was dropped."""
    source, target = Path(source).expanduser(), Path(target).expanduser()
    if not trust_pickle:
        raise PermissionError(f"converting {source} unpickles it fully, which runs any code stored in it; "
                              "pass --trust-pickle if you trust where the file comes from")
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    if target.resolve() == source.resolve():
        raise ValueError(f"{target}: choose an output path other than the input")
    payload = torch.load(source, map_location="cpu", weights_only=False)  # the user said so
    dropped: list[str] = []
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(safetensors_ready(extract_state_dict(plain(payload, dropped), str(source))), str(target))
        read_state_dict(target)  # reads back
    else:
        torch.save(plain(payload, dropped), target)
        torch.load(target, map_location="cpu", weights_only=True)  # reads back without unpickling code
    return target, file_digest(target), dropped


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
