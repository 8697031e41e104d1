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
    **{f"stedm.data.{name}": f"stedm.data.datasets.{name}"
       for name in ("demo", "flowers", "folder", "glas", "monuseg", "official_split", "synthetic")},
    "stedm.data.sampler": "stedm.data.mixing",
    "stedm.data.style": "stedm.data.style_sources",
    "stedm.data.wsi.sampling": "stedm.data.wsi.locations",
}

_SAMPLING_KEYS = {"sampler": "sampling.solver", "sample_steps": "sampling.steps",
                  **{key: f"sampling.{key}" for key in ("spacing", "cfg_scale", "rescale", "guidance_mode",
                                                         "batched_guidance", "shared_trunk")}}
#: per model ``_target_``: old constructor key -> new dotted key
RENAMED_MODEL_KEYS: dict[str, dict[str, str]] = {
    "stedm.modules.style_diffusion.StyleDiffusion": _SAMPLING_KEYS,
    "stedm.modules.ssl_pretrain.SSLPretrainer": {
        **{key: _SAMPLING_KEYS[key] for key in ("sampler", "sample_steps")},
        **{key: f"noise_schedule.{key}" for key in ("beta_schedule", "beta_start", "beta_end",
                                                     "num_train_timesteps")}},
}
#: keys of a run's config: old dotted key -> new one (``*`` stands for any one part)
RENAMED_KEYS: dict[str, str] = {
    "style_sampling.sampler": "style_sampling.source",
    "style_sampling_trained.sampler": "style_sampling_trained.source",  # a pair folder's settings
    "data.sampling": "data.locations",
    "data.dataset.*.sampling": "data.dataset.*.locations",
}
#: keys of a QC report (``python -m stedm.qc``'s ``report.json``): old -> new
RENAMED_QC_KEYS: dict[str, str] = {"layout_fidelity_iou_fg": "layout_fidelity_iou_mean",
                                   "ceiling_real_test_iou_fg": "ceiling_real_test_iou_mean"}

Path = tuple[str, ...]


def current_target(target: str) -> str:
    """A ``_target_`` with its module's moved path replaced by the current one."""
    module, _, name = str(target).rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def _renamed(path: Path, renames: dict[str, str]) -> Path:
    for old, new in renames.items():
        old_parts, new_parts = old.split("."), new.split(".")
        head = path[:len(old_parts)]
        if len(head) == len(old_parts) and all(o in ("*", p) for o, p in zip(old_parts, head)):
            stars = iter(p for o, p in zip(old_parts, head) if o == "*")
            return (*[next(stars) if n == "*" else n for n in new_parts], *path[len(old_parts):])
    return path


def _upgraded_leaves(leaves: dict[Path, Any], model: Path | None) -> dict[Path, Any]:
    renames = dict(RENAMED_KEYS)
    if model is not None:
        prefix = ".".join(model) + "." if model else ""
        renames.update({prefix + old: prefix + new for old, new in
                        RENAMED_MODEL_KEYS.get(str(leaves.get((*model, "_target_"))), {}).items()})
    return {_renamed(path, renames): current_target(value) if path[-1:] == ("_target_",) and isinstance(value, str)
            else value for path, value in leaves.items()}


def _leaves(value: Any, path: Path = ()) -> dict[Path, Any]:
    if isinstance(value, dict) and value:
        return {leaf: v for key, item in value.items() for leaf, v in _leaves(item, (*path, str(key))).items()}
    return {path: value}


def upgrade(config: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """A config (nested dicts) with what an earlier version kept elsewhere moved to today's place:
    renamed keys (:data:`RENAMED_KEYS`), the constructor keys of the model at ``model`` (a dotted
    key, ``""`` for a model config itself: :data:`RENAMED_MODEL_KEYS`), and every ``_target_``
    naming its module's current path. A current config comes back equal."""
    if not config:
        return config
    upgraded: dict[str, Any] = {}
    leaves = _leaves(config)
    for path, value in _upgraded_leaves(leaves, None if model is None else tuple(filter(None, model.split(".")))
                                        ).items():
        node = upgraded
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return upgraded


def stale_keys(config: dict[str, Any]) -> list[str]:
    """``"old -> new"`` for each key of ``config`` (nested dicts) that has moved (:data:`RENAMED_KEYS`)."""
    found = {}
    for path in _leaves(config):
        for old, new in RENAMED_KEYS.items():
            key = path[:len(old.split("."))]
            renamed = _renamed(key, {old: new})
            if renamed != key:
                found[".".join(key)] = ".".join(renamed)
    return [f"{old} -> {new}" for old, new in found.items()]


def refuse_stale_keys(cfg: Any) -> None:
    """Refuse a run config (a user's own YAML, written for an earlier version) that still uses a
    moved key: it would otherwise be ignored, or fail far from its cause. Names each and its new name."""
    from omegaconf import OmegaConf

    stale = stale_keys(OmegaConf.to_container(cfg, resolve=False))
    if stale:
        raise ValueError("this config uses keys that have been renamed; rename them in your config files "
                         "(conf/) or overrides: " + "; ".join(stale))


def upgrade_qc_report(report: dict[str, Any]) -> dict[str, Any]:
    """A QC report written by an earlier version, at today's keys (the same values)."""
    return {RENAMED_QC_KEYS.get(key, key): value for key, value in report.items()}


def upgrade_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """A model config (``_target_`` + constructor keys) as stored by train_diff.py, at today's keys."""
    return upgrade(config, model="")


def upgrade_flat(flat: dict[str, Any], model: str = "model") -> dict[str, Any]:
    """The same for a flattened config (dotted keys, a run's identity, whose model is ``model``):
    ``model.sample_steps`` of a StyleDiffusion becomes ``model.sampling.steps``."""
    leaves = {tuple(key.split(".")): value for key, value in flat.items()}
    return {".".join(path): value for path, value in _upgraded_leaves(leaves, tuple(model.split("."))).items()}


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
