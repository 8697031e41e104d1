"""python -m stedm.train_first_stage: a few steps on fixture data, exact resume, metrics on an
identity-like model, and the export plugging into diffusion.first_stage.weights_path."""

from __future__ import annotations

import pytest
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


def test_discriminator_starts_late_and_resume_is_exact(tmp_path):
    gan = [*TRAIN, "model.disc_weight=0.5", "model.disc_start=1", "model.disc_channels=8", "model.disc_layers=2"]
    whole = compose_in(tmp_path / "a", "train_first_stage", [*gan, "trainer.max_steps=4"])
    trainer = train_first_stage(whole)
    assert len(trainer.optimizers[0].param_groups) == 2  # autoencoder, discriminator
    assert {"train/g_loss", "train/d_loss", "train/d_weight"} <= set(trainer.callback_metrics)
    split = tmp_path / "b"
    train_first_stage(compose_in(split, "train_first_stage", [*gan, "trainer.max_steps=2"]))  # discriminator on from step 1
    ckpt = split / "results" / "checkpoints" / whole.run_name / "last.ckpt"
    first = torch.load(ckpt, weights_only=True)["state_dict"]
    trained = trainer.lightning_module.discriminator.state_dict()  # the whole run's, 2 steps further
    assert any(not torch.equal(first[f"discriminator.{k}"], v) for k, v in trained.items() if v.is_floating_point())
    train_first_stage(compose_in(split, "train_first_stage", [*gan, "trainer.max_steps=4"]))
    a = torch.load(tmp_path / "a" / "results" / "checkpoints" / whole.run_name / "last.ckpt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert any(k.startswith("discriminator.") for k in a["state_dict"])


def test_lpips_only_from_a_local_file(tmp_path):
    from torchmetrics.functional.image.lpips import _LPIPS

    from stedm.modules.first_stage import load_lpips

    with pytest.raises(FileNotFoundError, match="model.lpips_weights"):
        load_lpips(str(tmp_path / "missing.safetensors"))
    full = _LPIPS(pretrained=False, net="vgg", pnet_rand=True).state_dict()
    torch.save({k: v for k, v in full.items() if k.startswith("lin")}, tmp_path / "lin.pth")  # LPIPS' own file
    with pytest.raises(ValueError, match=r"model.lpips_weights=.*no VGG backbone weights"):
        load_lpips(str(tmp_path / "lin.pth"))
    torch.save(full, tmp_path / "lpips.pth")
    net = load_lpips(str(tmp_path / "lpips.pth"))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in full.items())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(net(x, x).mean()) < 1e-6 < float(net(x, -x).mean())
    assert not any(p.requires_grad for p in net.parameters())
