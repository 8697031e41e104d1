"""OmegaConf resolvers used by ``conf/`` (registered when :mod:`stedm` is imported), and the one
way settings are compared (run identities, pair-folder settings, predict_diff's choices)."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def _range(start: int, stop: int) -> ListConfig:
    return OmegaConf.create(list(range(int(start), int(stop))))


def entries_tag(dataset: DictConfig, ratios: ListConfig | None = None) -> str:
    """Run-name part that tells dataset mixes apart: ``a`` or ``a-0.2_b@folder-0.8``."""
    names = list(dataset.keys())
    parts = []
    for i, name in enumerate(names):
        part = name
        folder = dataset[name].get("folder_name") if isinstance(dataset[name], DictConfig) else None
        if folder not in (None, "???") and not OmegaConf.is_missing(dataset[name], "folder_name"):
            part += f"@{folder}"
        if ratios is not None and len(names) > 1:
            part += f"-{float(ratios[i]):g}"
        parts.append(part)
    return re.sub(r"[^A-Za-z0-9_.@+-]", "-", "_".join(parts))


def _choose(condition: bool, if_true: str, if_false: str) -> str:
    return if_true if condition else if_false


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("range", _range, replace=True)
    OmegaConf.register_new_resolver("entries", entries_tag, replace=True)
    OmegaConf.register_new_resolver("choose", _choose, replace=True)


# -- comparing settings ---------------------------------------------------------------------------
def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{dotted.key: leaf}`` (an empty dict is a leaf)."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items()
                for k, v in flatten(item, f"{prefix}.{key}" if prefix else str(key)).items()}
    return {prefix: value}


def differences(old: dict[str, Any], new: dict[str, Any], allowed: tuple[str, ...] | list[str] = ()) -> list[str]:
    """``key: old -> new`` for every leaf that differs, except keys matching an ``allowed``
    pattern (fnmatch) or lying below one."""
    a, b = flatten(old), flatten(new)
    found = []
    for key in sorted(set(a) | set(b)):
        if any(fnmatch.fnmatchcase(key, pattern) or key.startswith(pattern + ".") for pattern in allowed):
            continue
        before, after = a.get(key, "<absent>"), b.get(key, "<absent>")
        if before != after:
            found.append(f"{key}: {before!r} -> {after!r}")
    return found
