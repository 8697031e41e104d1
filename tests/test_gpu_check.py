"""benchmarks/gpu_check.py: its CPU dry run goes through every script and measurement and
writes both tables; benchmarks/gpu_wheels.sh lists every package our code imports that the GPU
machine lacks (checked without downloading), and our torch range admits the machine's torch."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from test_packaging import distribution_name, project, top_level_imports

ROOT = Path(__file__).resolve().parents[1]
#: What the GPU machine has (its image's package list, /work/.library/device/KINDS.md, 2026-11),
#: as far as our code and its requirements go.
ON_GPU_MACHINE = {
    "torch", "torchvision", "pytorch-lightning", "lightning", "lightning-utilities", "torchmetrics", "timm",
    "scikit-image", "opencv-python-headless", "tifffile", "numpy", "scipy", "pandas", "matplotlib", "pillow",
    "tensorboard", "tqdm", "safetensors", "pyyaml", "huggingface-hub", "filelock", "requests", "regex",
    "packaging", "cloudpickle", "fsspec", "zipp", "imageio", "networkx", "lazy-loader", "psutil",
}
GPU_TORCH = "2.11.0"
GPU_PYTHON = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3"}


def wheel_list() -> dict[str, str]:
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_wheels.sh"), "--list"], capture_output=True,
                         text=True, check=True).stdout.split()
    pins = dict(line.split("==") for line in out)
    return {distribution_name(k): v for k, v in pins.items()}


def test_wheel_list_holds_every_missing_import_and_requirement_once():
    pins = wheel_list()
    assert len(pins) == len(set(pins))
    # the set is there
    assert {"diffusers", "hydra-core", "omegaconf", "segmentation-models-pytorch", "albumentations",
            "openslide-python", "submitit"} <= set(pins)
    owners = md.packages_distributions()
    imports = [*top_level_imports()]
    for script in ("gpu_check.py", "diffusion.py", "harness.py"):
        imports += [line.split()[1].split(".")[0] for line in (ROOT / "benchmarks" / script).read_text().splitlines()
                    if line.startswith(("import ", "from ")) and not line.startswith("from __future__")]
    missing = {}
    for module in set(imports):
        if module in sys.stdlib_module_names or module in ("stedm", "benchmarks", "wandb"):
            continue
        dists = {distribution_name(d) for d in owners[module]}
        if not dists & (ON_GPU_MACHINE | set(pins)):
            missing[module] = dists
    assert not missing, f"imported, not on the GPU machine, not in benchmarks/gpu_wheels.txt: {missing}"
    # what the listed wheels need (installed versions' requirements, for Python 3.12) is there too
    for name, version in pins.items():
        assert md.version(name) == version, f"{name}: gpu_wheels.txt pins {version}, tested with {md.version(name)}"
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**GPU_PYTHON, "extra": ""}):
                continue
            dist = distribution_name(req.name)
            assert dist in ON_GPU_MACHINE | set(pins), f"{name} needs {req}, neither on the GPU machine nor listed"
            if dist in pins:
                assert req.specifier.contains(pins[dist], prereleases=True), f"{name} needs {req}, listed {pins[dist]}"


def test_requirement_ranges_admit_the_gpu_machines_torch():
    torch_spec = next(Requirement(r) for r in project()["dependencies"] if Requirement(r).name == "torch")
    assert torch_spec.specifier.contains(GPU_TORCH)
    assert SpecifierSet(project()["requires-python"]).contains("3.12.3")


@pytest.mark.e2e
def test_cpu_dry_run_runs_every_script_and_writes_both_tables(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["script"] for s in result["scripts"]] == ["train_diff.py", "predict_diff.py", "train_seg.py",
                                                        "pretrain_ssl.py", "finetune_ssl.py"]
    assert all(s["ok"] for s in result["scripts"])
    assert result["bf16_peak_tflops"] > 0
    for name in ("training step", "synthetic pair"):
        assert result[name]["tflops"] > 0 and result[name]["seconds"] > 0 and result[name]["peak_mib"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "of bf16 peak" in table and "training step" in table and "finetune_ssl.py | ok" in table
    assert result["settings"]["location.channels_last=false"]["tflops"] > 0  # README's settings to time on a GPU
    assert "training step with location.channels_last=false" in table
