"""pyproject.toml declares what the package imports; environment.yaml installs the same."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_diff.py", "predict_diff.py", "train_seg.py", "pretrain_ssl.py", "finetune_ssl.py")
OPTIONAL = {"wandb": "wandb"}
"""Imports that may be missing (guarded), and the extra that declares each."""


def normalise(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    return distribution_name(name), spec.replace(" ", "")


def distribution_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def top_level_imports() -> dict[str, set[str]]:
    """Absolute top-level imports of the package and the five scripts -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path in [*sorted((ROOT / "stedm").rglob("*.py")), *(ROOT / s for s in SCRIPTS)]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_direct_import_is_declared():
    declared = {distribution_name(normalise(r)[0]) for r in project()["dependencies"]}
    extras = {name: {normalise(r)[0] for r in reqs} for name, reqs in project()["optional-dependencies"].items()}
    owners = importlib.metadata.packages_distributions()
    imports = top_level_imports()
    assert {"torch", "tqdm", "safetensors", "submitit", "tiffslide"} <= set(imports)  # the scan sees them
    undeclared = {}
    for module, files in imports.items():
        if module in sys.stdlib_module_names or module == "stedm":
            continue
        if module in OPTIONAL:
            assert distribution_name(module) in extras[OPTIONAL[module]], f"{module}: not in the {OPTIONAL[module]} extra"
            continue
        assert module in owners, f"{module} (imported by {sorted(files)}) is not installed"
        if not {distribution_name(d) for d in owners[module]} & declared:
            undeclared[module] = (owners[module], sorted(files))
    assert not undeclared, f"imported but not declared in pyproject.toml [project.dependencies]: {undeclared}"


def test_environment_yaml_matches_pyproject():
    wanted = dict(normalise(r) for r in project()["dependencies"] + project()["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    assert env["name"] == "STEDM"
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = dict(normalise(r) for r in pip if not r.startswith("-e"))
    assert listed == wanted
    assert "-e ." in pip  # the package itself


def test_python_range_is_one_range_everywhere():
    requires = project()["requires-python"]  # ">=3.10,<3.13"
    low, high = re.fullmatch(r">=(3\.\d+),<(3\.\d+)", requires).groups()
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert pythons == [f"python{requires}"], "environment.yaml's python must be pyproject's requires-python"
    newest = f"3.{int(high.split('.')[1]) - 1}"
    assert f"Python {low}–{newest}" in (ROOT / "README.md").read_text()


def test_readme_says_wandb_needs_its_extra():
    readme = (ROOT / "README.md").read_text()
    assert "logger=[wandb]" in readme and "pip install -e .[wandb]" in readme
    assert "wandb" in project()["optional-dependencies"]


def test_wandb_logger_names_its_extra_when_missing(compose_cfg, tmp_path):
    import importlib.util

    import pytest

    from types import SimpleNamespace

    from stedm.run import build_loggers

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    cfg = compose_cfg("train_seg", ["preset=tiny", "logger=[wandb]", "wandb.project=mine", "wandb.entity=lab"])
    assert (cfg.wandb.project, cfg.wandb.entity) == ("mine", "lab")
    with pytest.raises(ImportError, match=r"logger=\[wandb\] needs the wandb package: pip install -e \.\[wandb\]"):
        build_loggers(cfg, SimpleNamespace(run_dir=tmp_path))  # loggers use only the run folder
