"""python -m stedm.train_first_stage: a few steps on fixture data, exact resume, metrics on an
identity-like model, and the export plugging into diffusion.first_stage.weights_path."""

from __future__ import annotations

import torch

from conftest import compose_in
from stedm.models.first_stage import build_first_stage
from stedm.models.weights import read_state_dict
from stedm.modules.first_stage import reconstruction_metrics
from stedm.train_first_stage import train_first_stage

TRAIN = ["data.patch_size=32", "location.precision=32-true", "data.samples=8", "trainer.enable_progress_bar=false",
         "first_stage.config.block_out_channels=[8,16]", "first_stage.config.norm_num_groups=4", "lr=1e-3"]


def test_metrics_of_identity_and_noise():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    perfect = reconstruction_metrics(x, x)
    assert perfect["psnr"] > 60 and abs(float(perfect["ssim"]) - 1) < 1e-4
    noisy = reconstruction_metrics(x, x + 0.1 * torch.randn_like(x))
    assert 20 < float(noisy["psnr"]) < 30 and float(noisy["ssim"]) < 0.99


def test_train_export_and_plug_in(tmp_path):
    cfg = compose_in(tmp_path, "train_first_stage", [*TRAIN, "trainer.max_steps=3"])
    trainer = train_first_stage(cfg)
    assert {"val/psnr", "val/ssim"} <= set(trainer.callback_metrics)
    run = tmp_path / "results" / "runs" / "train_first_stage" / cfg.run_name
    assert any((run / "reconstructions").glob("*.png"))
    stage = build_first_stage("kl", weights_path=str(run / "final.safetensors"))
    exported = read_state_dict(run / "final.safetensors")
    assert all(torch.equal(stage.model.state_dict()[k], v) for k, v in exported.items())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert stage.encode(x).shape == (1, 3, 16, 16) and stage.downsample_factor == 2


def test_resume_is_exact(tmp_path, caplog):
    whole = compose_in(tmp_path / "a", "train_first_stage", [*TRAIN, "trainer.max_steps=4"])
    train_first_stage(whole)
    split = tmp_path / "b"
    train_first_stage(compose_in(split, "train_first_stage", [*TRAIN, "trainer.max_steps=2"]))
    with caplog.at_level("INFO", logger="stedm.run"):
        train_first_stage(compose_in(split, "train_first_stage", [*TRAIN, "trainer.max_steps=4"]))
    assert "continuing from" in caplog.text  # the second half resumed from last.ckpt
    a = read_state_dict(tmp_path / "a" / "results" / "runs" / "train_first_stage" / whole.run_name / "final.safetensors")
    b = read_state_dict(split / "results" / "runs" / "train_first_stage" / whole.run_name / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
