"""Model cards: one JSON card beside every safetensors weights file STEDM writes or caches.

``NAME.safetensors`` holds the tensors; ``NAME.card.json`` says what they are::

    {"format": "stedm-card/1",
     "task": "train_diff" | "train_first_stage" | "pretrain_ssl" | "weights-cache" | ...,
     "weights": {"file": "NAME.safetensors", "sha256": "..."},
     "model": {...},          # what rebuilds the network (e.g. first stage kind + diffusers config)
     "source": {...},         # weights cache: url, sha256 of the download, converter version
     "config": {...}, "data": [...], "metrics": {...},  # runs: resolved config, data entries, final metrics
     "provenance": {"git_commit": ..., "packages": {...}, "created": ...}}

The same card serves the weights cache (:mod:`stedm.weights_cache`), every run's final export
(:class:`stedm.callbacks.ExportWeights`) and ``pretrained_unet``; the one loader is
:func:`stedm.models.weights.read_state_dict`, which checks a safetensors file against the
sha256 of its card whenever there is one (a changed or damaged copy is refused).
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import Tensor

from stedm.fileio import atomic_path, file_digest, write_text_atomic

CARD_FORMAT = "stedm-card/1"
CARD_SUFFIX = ".card.json"
PACKAGES = ("stedm", "torch", "diffusers", "pytorch-lightning", "safetensors", "hydra-core", "timm", "torchvision")


def card_path(weights: str | Path) -> Path:
    """``X.safetensors`` -> ``X.card.json``."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + CARD_SUFFIX)


def provenance() -> dict[str, Any]:
    """Git commit of the STEDM checkout (null outside one), package versions, time, host."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(), "packages": packages,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node()}


def write_weights(path: str | Path, tensors: dict[str, Tensor], card: dict[str, Any],
                  overwrite: bool = False) -> tuple[Path, str]:
    """Write ``tensors`` to ``path`` (``.safetensors``) and ``card`` (completed with format, file,
    sha256 and provenance) beside it, each atomically (temporary file, then rename; the card
    last, so a card always describes a complete weights file). An existing file is refused
    unless ``overwrite``. Returns the path and the weights' sha256."""
    from safetensors.torch import save_file

    from stedm.models.weights import safetensors_ready

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights are written as .safetensors")
    card_file = card_path(path)
    if not overwrite and (path.exists() or card_file.exists()):
        raise FileExistsError(f"{path} exists already; it is not overwritten (move it away or choose another name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(safetensors_ready(tensors), str(tmp), metadata={"format": CARD_FORMAT, "card": card_file.name})
        digest = file_digest(tmp)
        full = {"format": CARD_FORMAT, **card, "weights": {"file": path.name, "sha256": digest}}
        full.setdefault("provenance", provenance())
    write_card(card_file, full)
    return path, digest


def write_card(path: Path, card: dict[str, Any]) -> None:
    write_text_atomic(json.dumps(card, indent=2, sort_keys=False, default=str) + "\n", path, sync=True)


def read_card(weights: str | Path) -> dict[str, Any] | None:
    """The card beside ``weights``, or None when there is none; a card that is not ours is refused."""
    path = card_path(weights)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable model card ({err}); restore it or delete it with its weights") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{path}: not a STEDM model card (format {CARD_FORMAT!r} expected)")
    return card


def verify(weights: str | Path, card: dict[str, Any], argument: str) -> None:
    """``weights`` has the sha256 its card records; a changed or damaged copy is refused."""
    expected = (card.get("weights") or {}).get("sha256")
    if expected and file_digest(weights) != expected:
        raise ValueError(f"{argument}={str(weights)!r}: its sha256 differs from the one its card "
                         f"{card_path(weights).name} records ({expected[:12]}...); the file was changed or damaged "
                         "(copied incompletely?): copy or fetch it again")
