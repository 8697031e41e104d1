"""What moved, in one place: old module paths and old config keys, mapped to where they live now.

Configs and checkpoints written by an earlier version name modules (``_target_``) and keys that
have since moved. Importing an old module path gives the new module (:data:`MOVED_MODULES`,
installed by ``import stedm``), and a model config stored in an old checkpoint, or an old run's
identity, is read with its keys renamed (:func:`upgrade_model_config`, :func:`upgrade_flat`),
so a checkpoint written before a move still loads in ``predict_diff.py`` and resumes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

#: old module path -> new one
MOVED_MODULES: dict[str, str] = {
    "stedm.diffusion.sampling": "stedm.diffusion.solvers",
    "stedm.diffusion.weighting": "stedm.losses.diffusion",
    "stedm.losses.ssl": "stedm.losses.finetune",
}

_SAMPLING_KEYS = {"sampler": "sampling.solver", "sample_steps": "sampling.steps",
                  **{key: f"sampling.{key}" for key in ("spacing", "cfg_scale", "rescale", "guidance_mode",
                                                         "batched_guidance", "shared_trunk")}}
#: per model ``_target_``: old constructor key -> new dotted key
RENAMED_MODEL_KEYS: dict[str, dict[str, str]] = {
    "stedm.modules.style_diffusion.StyleDiffusion": _SAMPLING_KEYS,
    "stedm.modules.ssl_pretrain.SSLPretrainer": {
        "sampler": "sampling.solver", "sample_steps": "sampling.steps",
        **{key: f"noise_schedule.{key}" for key in ("beta_schedule", "beta_start", "beta_end",
                                                     "num_train_timesteps")}},
}


def _renames(target: Any) -> dict[str, str]:
    return RENAMED_MODEL_KEYS.get(str(target), {})


def upgrade_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """A model config (``_target_`` + constructor keys) with the keys of an earlier version moved
    to their current place; a current config comes back as it is."""
    renames = _renames(config.get("_target_"))
    if not renames or not any(key in config for key in renames):
        return config
    upgraded = {key: value for key, value in config.items() if key not in renames}
    for old, new in renames.items():
        if old in config:
            head, _, leaf = new.partition(".")
            upgraded[head] = {**(upgraded.get(head) or {}), leaf: config[old]}
    return upgraded


def current_target(target: str) -> str:
    """A ``_target_`` with its module's moved path replaced by the current one."""
    module, _, name = str(target).rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def upgrade_flat(flat: dict[str, Any], prefix: str = "model.") -> dict[str, Any]:
    """The same for a flattened config (dotted keys, a run's identity): ``model.sample_steps`` of
    a StyleDiffusion becomes ``model.sampling.steps``, and every ``_target_`` names its module's
    current path."""
    renames = _renames(flat.get(f"{prefix}_target_"))
    upgraded = {}
    for key, value in flat.items():
        if key.startswith(prefix) and key[len(prefix):] in renames:
            key = prefix + renames[key[len(prefix):]]
        upgraded[key] = current_target(value) if key.endswith("_target_") and isinstance(value, str) else value
    return upgraded


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module that lives at the new one (the same object)."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - the import system's signature
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec):  # noqa: ANN001
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module) -> None:  # noqa: ANN001 - already executed under its new name
        pass


def install() -> None:
    """Make the old module paths importable (idempotent; ``import stedm`` calls it)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
