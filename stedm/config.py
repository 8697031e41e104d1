"""OmegaConf resolvers used by ``conf/`` (registered when :mod:`stedm` is imported)."""

from __future__ import annotations

import re

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
