"""SSL pretraining: the weighted diffusion loss and a real Lightning run that hands weights to fine-tuning."""

from __future__ import annotations

import copy
import functools

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

from histology_fixtures import write_glas
from stedm.data.datasets.glas import GlasDataset
from stedm.diffusion.solvers import noise_for_indices
from stedm.models.ssl_unet import build_ssl_segmenter, build_ssl_unet, load_pretrained_unet
from stedm.modules.ssl_pretrain import PRETRAINED_FILENAME, SSLPretrainer


def tiny_pretrainer(**kwargs) -> SSLPretrainer:
    torch.manual_seed(0)
    return SSLPretrainer(build_ssl_unet("tiny"), **kwargs)


def test_loss_is_the_p2_weighted_epsilon_mse_averaged_over_the_batch():
    module = tiny_pretrainer()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn_like(images)
    t = torch.tensor([10, 900])
    loss = module.diffusion_loss(images, noise, t)
    a = module.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        eps_hat = module.net(a.sqrt() * images + (1 - a).sqrt() * noise, t)
    expected = ((1 - a.flatten()) * ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    doubled = module.diffusion_loss(images.repeat(2, 1, 1, 1), noise.repeat(2, 1, 1, 1), t.repeat(2))
    torch.testing.assert_close(doubled, loss, rtol=1e-5, atol=1e-7)


def test_sampling_trajectory_is_seeded_and_runs_every_solver():
    module = tiny_pretrainer(sampling={"solver": "ddpm", "steps": 4}, sample_frames=3)
    frames = module.sample_trajectory(2, (3, 16, 16))
    noise = noise_for_indices(range(2), 0, (3, 16, 16))
    assert frames.shape == (3, 2, 3, 16, 16) and torch.equal(frames[0], noise)  # starts at the fixed noise
    torch.testing.assert_close(module.sample_trajectory(2, (3, 16, 16)), frames)  # seeded: reproducible
    for solver in ("ddim", "dpm_solver"):
        module.sampling = module.sampling.replace(solver=solver)
        assert torch.isfinite(module.sample_trajectory(2, (3, 16, 16))).all()


def test_lightning_pretraining_writes_weights_that_fine_tuning_loads(tmp_path):
    # whole validation images need not be divisible by the U-Net's down-sampling factor
    write_glas(tmp_path / "glas", train=4, test_a=1, test_b=1, size=(32, 32), test_size=(34, 37))
    pool = GlasDataset(tmp_path / "glas", role="unlabelled", split="train", class_train_samples=0)
    loader = DataLoader(pool, batch_size=2, shuffle=True)
    module = tiny_pretrainer(optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.0), lr=1e-3,
                             sample_every_n_epochs=1, sampling={"solver": "ddpm", "steps": 3}, sample_images=2, sample_frames=4)
    initial = {k: v.clone() for k, v in module.net.state_dict().items()}
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, default_root_dir=tmp_path / "run", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[checkpoint])
    whole_images = DataLoader(GlasDataset(tmp_path / "glas", split="test", test_parts=["testA"]), batch_size=1)
    trainer.fit(module, loader, whole_images)

    assert module.ema.optimization_step == 2
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW)
    grid = Image.open(tmp_path / "run" / "samples" / "epoch_000.png")
    assert grid.size == (2 + 4 * 34, 2 + 2 * 34)  # 4 frames x 2 samples of 32 px, 2 px padding
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert len(saved["ema"]["shadow_params"]) == len(list(module.net.parameters()))

    config, state = load_pretrained_unet(tmp_path / "run" / PRETRAINED_FILENAME)
    assert config == module.net.config
    ema = module.ema_state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in state)
    assert any(not torch.equal(state[k], initial[k]) for k in state)  # it trained
    assert any(not torch.equal(state[k], module.net.state_dict()[k]) for k in state)  # EMA, not raw weights
    _, live = load_pretrained_unet(tmp_path / "run" / PRETRAINED_FILENAME, "live")  # and the live ones too
    assert live.keys() == state.keys() and all(torch.equal(live[k], v) for k, v in module.net.state_dict().items())

    segmenter = build_ssl_segmenter(2, preset="tiny", pretrained_path=tmp_path / "run" / PRETRAINED_FILENAME)
    missing = segmenter.unet.load_backbone(state)
    assert missing and all(k.startswith("head.") for k in missing)
    assert all(torch.equal(segmenter.unet.state_dict()[k], v) for k, v in state.items() if not k.startswith("head."))
    assert segmenter(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="SSLUNet"):
        SSLPretrainer(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="model.sampling.solver=euler"):
        tiny_pretrainer(sampling={"solver": "euler"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sampler'\]"):
        tiny_pretrainer(sampling={"sampler": "ddim"})
    with pytest.raises(ValueError, match="weighting"):
        tiny_pretrainer(weighting="snr")
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny_pretrainer(attention="flash")


def test_fast_path_computes_the_reference_paths_step():
    # Same weights and inputs: the original's way (materialised softmax attention, for-loop Adam,
    # per-parameter EMA loop) and the default (SDPA, fused Adam, foreach EMA) give the same loss
    # and gradients, and from the same gradients the same updated weights and EMA, up to float rounding.
    torch.manual_seed(0)
    net = build_ssl_unet("tiny")
    ref = SSLPretrainer(copy.deepcopy(net), attention="explicit", ema_foreach=False)
    fast = SSLPretrainer(copy.deepcopy(net))
    assert type(ref.net.mid_attn.processor) is not type(fast.net.mid_attn.processor)
    assert ref.net.state_dict().keys() == fast.net.state_dict().keys()
    optimizers = [torch.optim.Adam(ref.net.parameters(), lr=1e-3),
                  torch.optim.Adam(fast.net.parameters(), lr=1e-3, fused=True)]
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    noise, t = torch.randn_like(images), torch.tensor([3, 800])
    for _ in range(2):  # the EMA decay is 0 on its first step
        losses = []
        for module, optimizer in zip((ref, fast), optimizers):
            optimizer.zero_grad()
            losses.append(module.diffusion_loss(images, noise, t))
            losses[-1].backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(ref.net.named_parameters(), fast.net.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
            b.grad.copy_(a.grad)  # Adam amplifies rounding in near-zero gradients: step from equal ones
        for module, optimizer in zip((ref, fast), optimizers):
            optimizer.step()
            module.ema.step(module.net.parameters())
        for (name, a), b in zip(ref.net.named_parameters(), fast.net.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        for a, b in zip(ref.ema.shadow_params, fast.ema.shadow_params, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
