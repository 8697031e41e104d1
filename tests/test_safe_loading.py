"""Weights and checkpoints are read without running code; pickles are converted only on request."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_in
from stedm.fileio import file_digest
from stedm.models.weights import UnsafeFileError, read_state_dict
from stedm.tasks.predict import TRUSTED_TARGETS, check_targets, predict_pairs

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates ``marker``: the code a crafted .pt file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def crafted(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)
    return path


def test_crafted_weights_path_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = crafted(tmp_path / "landscape.ckpt", marker)
    cfg = compose_in(tmp_path, "train_diff", ["preset=tiny", f"diffusion.denoiser.weights_path={path}"])
    with pytest.raises(Exception) as caught:
        instantiate(cfg.diffusion.denoiser)  # the real path: the builder reads its weights_path
    message = str(caught.value)
    assert not marker.exists()
    assert f"weights_path='{path}'" in message
    assert "python -m stedm.weights convert" in message and "--trust-pickle" in message
    with pytest.raises(UnsafeFileError, match=r"diffusion\.denoiser\.weights_path="):
        read_state_dict(path, "diffusion.denoiser.weights_path")
    assert not marker.exists()


def test_crafted_checkpoint_as_ckpt_name_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    run = tmp_path / "results" / "checkpoints" / "evil"
    run.mkdir(parents=True)
    crafted(run / "last.ckpt", marker)
    cfg = compose_in(tmp_path, "predict_diff", ["+ckpt_name=evil", "+predict_dir=out"])
    with pytest.raises(UnsafeFileError, match=r"ckpt_name=.*python -m stedm\.weights convert .* --trust-pickle"):
        predict_pairs(cfg)
    assert not marker.exists()
    assert not (tmp_path / "data" / "syn_data" / "out").exists()


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stedm.weights", "convert", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_convert_with_consent_writes_safetensors_that_load(tmp_path):
    # as the LDM release checkpoints: the weights under 'state_dict' next to pickled config objects
    state = {"model.diffusion_model.out.2.weight": torch.randn(3, 4), "first_stage_model.quant_conv.bias": torch.randn(3)}
    state["tied"] = state["first_stage_model.quant_conv.bias"]  # shares memory: safetensors needs a copy
    source = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": OmegaConf.create({"lr": 1.0})}, source)
    with pytest.raises(UnsafeFileError):
        read_state_dict(source)
    target = tmp_path / "ldm.safetensors"
    refused = convert(str(source), str(target))
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and not target.exists()
    done = convert(str(source), str(target), "--trust-pickle")
    assert done.returncode == 0, done.stderr
    assert f"sha256 {file_digest(target)}" in done.stdout
    loaded = read_state_dict(target)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_convert_whole_checkpoint_to_one_that_loads_weights_only(tmp_path):
    source = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "stedm_model_config": OmegaConf.create({"_target_": "stedm.x"}),
                "rng": __import__("numpy").arange(3)}, source)
    done = convert(str(source), str(tmp_path / "new.ckpt"), "--trust-pickle")
    assert done.returncode == 0, done.stderr
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert checkpoint["stedm_model_config"] == {"_target_": "stedm.x"} and torch.equal(checkpoint["rng"],
                                                                                        torch.arange(3))


def test_checkpoint_naming_an_untrusted_target_is_refused(tmp_path):
    run = tmp_path / "results" / "checkpoints" / "odd"
    run.mkdir(parents=True)
    config = {"_target_": "stedm.modules.style_diffusion.StyleDiffusion",
              "layout_encoder": {"_target_": "os.system", "command": "touch ran"}}
    torch.save({"state_dict": {}, "stedm_model_config": config}, run / "last.ckpt")  # plain values: loads safely
    cfg = compose_in(tmp_path, "predict_diff", ["+ckpt_name=odd", "+predict_dir=out"])
    with pytest.raises(ValueError, match=r"_target_='os\.system'.*trusted_targets"):
        predict_pairs(cfg)
    assert not (tmp_path / "data" / "syn_data" / "out").exists()


def test_allow_list_covers_our_configs_and_extends_by_key():
    used = {m for p in (ROOT / "conf").rglob("*.yaml") for m in re.findall(r"_target_:\s*(\S+)", p.read_text())}
    assert any(not t.startswith("stedm.") for t in used)
    check_targets([{"_target_": t} for t in sorted(used)], (), Path("x.ckpt"))  # all accepted
    assert set(TRUSTED_TARGETS) <= used  # and nothing beyond what conf/ uses
    nested = {"a": [{"b": {"_target_": "mypkg.models.Net"}}]}
    with pytest.raises(ValueError, match=r"mypkg\.models\.Net.*a\[0\]\.b"):
        check_targets(nested, (), Path("x.ckpt"))
    check_targets(nested, ["mypkg."], Path("x.ckpt"))
    check_targets(nested, ["mypkg.models.Net"], Path("x.ckpt"))


def test_importing_stedm_turns_off_the_albumentations_update_check():
    child = """
import os, urllib.request
opened = []
urllib.request.OpenerDirector.open = lambda self, url, *a, **k: opened.append(url)
import stedm
import albumentations
print(os.environ.get("NO_ALBUMENTATIONS_UPDATE"), opened)
"""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "[]"]
