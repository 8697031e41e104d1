"""The demo's latent path (preset=tiny diffusion=tiny_latent): the autoencoder that
``python -m stedm.train_first_stage data=demo preset=tiny`` trains plugs into the preset by its
run directory, train_diff runs diffusion in its latent space and predict_diff decodes pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_in
from stedm.models.first_stage import DiffusersFirstStage
from stedm.models.weights import read_state_dict
from stedm.tasks.diffusion import FIRST_STAGE_KEY, train_diffusion
from stedm.tasks.predict import predict_pairs
from stedm.train_first_stage import train_first_stage

SMALL = ["data.patch_size=32", "location.precision=32-true", "data.samples=8", "trainer.enable_progress_bar=false"]
AE = [*SMALL, "first_stage.config.block_out_channels=[8,16]", "first_stage.config.norm_num_groups=4", "lr=1e-3",
      "trainer.max_steps=2"]
LATENT = [*SMALL, "preset=tiny", "diffusion=tiny_latent", "trainer.max_steps=2", "diffusion.sample_every_n_steps=0"]


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEDM_WEIGHTS_DIR", str(tmp_path / "empty-cache"))


@pytest.mark.e2e
def test_latent_preset_trains_in_its_autoencoders_space(tmp_path):
    # without the autoencoder the preset refuses before any work, naming the key
    with pytest.raises(FileNotFoundError, match="diffusion.first_stage.weights_path=.*final.safetensors"):
        train_diffusion(compose_in(tmp_path, "train_diff", LATENT))
    assert not (tmp_path / "results" / "checkpoints").exists()

    ae = compose_in(tmp_path, "train_first_stage", AE)
    train_first_stage(ae)
    weights = tmp_path / "results" / "runs" / "train_first_stage" / ae.run_name / "final.safetensors"
    cfg = compose_in(tmp_path, "train_diff", LATENT)
    assert cfg.diffusion.first_stage.weights_path == str(weights)  # the preset names this run's export

    trainer = train_diffusion(cfg)
    stage = trainer.lightning_module.first_stage
    assert isinstance(stage, DiffusersFirstStage) and stage.downsample_factor == 2
    exported = read_state_dict(weights)
    assert all(torch.equal(stage.model.state_dict()[k], v) for k, v in exported.items())
    ckpt = torch.load(tmp_path / "results" / "checkpoints" / cfg.run_name / "last.ckpt", weights_only=True)
    assert ckpt[FIRST_STAGE_KEY]["kind"] == "kl"
    assert ckpt[FIRST_STAGE_KEY]["config"]["block_out_channels"] == [8, 16]  # the card's architecture
    assert all(torch.equal(ckpt["state_dict"][f"first_stage.model.{k}"], v) for k, v in exported.items())

    folder = predict_pairs(compose_in(tmp_path, "predict_diff", [
        "preset=tiny", "data.patch_size=32", "location.precision=32-true", "steps=2", "progress=false",
        "num_pairs=2", f"+ckpt_name={cfg.run_name}", "+predict_dir=latent"]))
    images = sorted(folder.glob("img_*.png"))
    masks = sorted(folder.glob("seg_*.png"))
    assert len(images) == len(masks) == 2
    # decoded back to pixel space at the patch size (the latent is 16 x 16)
    assert all(np.asarray(Image.open(p)).shape == (32, 32, 3) for p in images)
