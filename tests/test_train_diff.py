"""train_diff through its real config, on the demo data with tiny presets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import write_flowers
from stedm.tasks.diffusion import train_diffusion
from stedm.tasks.predict import load_model, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["preset=tiny", "data.patch_size=32", "data.samples=8", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
        "diffusion.sample_every_n_steps=0", "trainer.enable_progress_bar=false"]

SEED_TRAIN = ["location=cluster", "data=flowers", "style_sampling=augmented", "style_agg=mean",
              "data.class_train_samples=3"]
SEED_PREDICT = ["location=cluster", "data=flowers", "data/dataset=[flowers_anno,flowers_unanno]", "data.ratios=[1.0,1.0]",
                "style_sampling=augmented", "style_agg=mean", "data.class_train_samples=3", "cfg_scale=1.5",
                "+ckpt_name=YOUR_CKPT_NAME.ckpt", "+predict_dir=RESULTS_SUB_FOLDER"]
SEED_SEG = ["location=cluster", "data=flowers", "data/dataset=[flowers_anno,flowers_syn]", "data.ratios=[0.2,0.8]",
            "data.dataset.flowers_syn.folder_name=RESULTS_SUB_FOLDER", "data.class_train_samples=3"]


def run_dirs(cfg):
    ckpt = Path(cfg.location.result_dir) / "checkpoints" / cfg.run_name / "last.ckpt"
    return ckpt, Path(cfg.location.result_dir) / "runs" / cfg.task / cfg.run_name


@pytest.mark.parametrize("sampling,agg", [("none", "mean"), ("augmented", "mean"), ("augmented", "max"),
                                          ("augmented", "linear"), ("augmented", "svit")])
def test_train_diff_runs_and_checkpoint_reloads(compose_cfg, sampling, agg):
    cfg = compose_cfg("train_diff", [*TINY, f"style_sampling={sampling}", f"style_agg={agg}"])
    assert agg in cfg.run_name and sampling in cfg.run_name
    train_diffusion(cfg)
    ckpt, run = run_dirs(cfg)
    losses = pd.read_csv(run / "logs" / "metrics.csv")["train/loss"].dropna()
    assert len(losses) == 2 and losses.map(lambda v: torch.isfinite(torch.tensor(v)).item()).all()
    model = load_model(read_checkpoint(ckpt))
    assert (model.style is None) == (sampling == "none")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    state, shadow = checkpoint["state_dict"], checkpoint["ema"]["shadow_params"]
    # loaded for sampling: the EMA weights replace the trainable ones, everything else as stored
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert model.ema is None and len(trainable) == len(shadow)
    assert all(torch.equal(model.get_parameter(name), s) for name, s in zip(trainable, shadow))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k not in trainable)


def test_sample_grid_is_written(compose_cfg):
    cfg = compose_cfg("train_diff", [*TINY, "diffusion.sample_every_n_steps=2", "sampling.steps=2"])
    train_diffusion(cfg)
    _, run = run_dirs(cfg)
    assert (run / "samples" / "step_000002.png").is_file()


@pytest.mark.parametrize("script,args", [("train_diff.py", SEED_TRAIN), ("predict_diff.py", SEED_PREDICT),
                                         ("train_seg.py", SEED_SEG)])
def test_seed_commands_compose_unchanged(script, args):
    out = subprocess.run([sys.executable, script, *args, "--cfg", "job"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "name: flowers" in out.stdout and "devices: 4" in out.stdout


def test_seed_train_command_runs_on_oxford_layout(compose_cfg, tmp_path):
    write_flowers(tmp_path / "data" / "flowers", classes=[0, 1, 50], per_class=4)
    overrides = [o for o in SEED_TRAIN if not o.startswith("location=")]
    cfg = compose_cfg("train_diff", [*overrides, *TINY])
    assert cfg.data.dataset.flowers_anno.class_train_samples == 3
    train_diffusion(cfg)
    assert run_dirs(cfg)[0].is_file()
