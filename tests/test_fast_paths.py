"""The fast default paths stay honest: compilation keeps the checkpoints as they are, and the
reference path (the original's way) stays one override away. (bf16 against fp32: test_precision.py.)"""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from stedm.diffusion.options import run_options
from stedm.models.denoiser import build_denoiser
from stedm.models.first_stage import build_first_stage
from stedm.models.layout import LayoutEncoder
from stedm.models.style import LinearAggregator, StyleExtractor, build_style_encoder
from stedm.modules.style_diffusion import StyleDiffusion
from stedm.run import maybe_compile

TINY_UNET = {"block_out_channels": (16, 32), "time_embedding_dim": 32, "norm_num_groups": 8, "attention_heads": 1}
SIZE = 16


def style_diffusion(**kwargs) -> StyleDiffusion:
    torch.manual_seed(0)
    return StyleDiffusion(
        build_denoiser("tiny", style_dim=16, **TINY_UNET), build_first_stage("identity"), LayoutEncoder(2),
        StyleExtractor(build_style_encoder("timm:test_resnet", out_dim=16), LinearAggregator(2, 16)),
        optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.0), lr=1e-3, **kwargs)


def batches(n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1,
             "mask": torch.randint(0, 2, (2, SIZE, SIZE), generator=g),
             "style": torch.rand(2, 2, 3, SIZE, SIZE, generator=g) * 2 - 1} for _ in range(n)]


def test_fused_adamw_takes_the_same_steps_as_the_default_one():
    module = style_diffusion()
    params = [p for p in module.denoiser.parameters()]
    runs = []
    for fused in (None, True):
        weights = [p.detach().clone().requires_grad_() for p in params]
        optimizer = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.0, fused=fused)
        for step in range(3):
            for w in weights:
                w.grad = torch.sin(w.detach() * (step + 1))
            optimizer.step()
        runs.append(weights)
    for default, fused in zip(*runs):
        torch.testing.assert_close(fused, default, atol=1e-6, rtol=1e-5)


def test_compile_compiles_the_named_networks_in_place_and_keeps_checkpoint_keys():
    module = style_diffusion()
    keys = list(module.state_dict())
    cfg = OmegaConf.create({"location": {"compile": "default"}})
    assert maybe_compile(cfg, module) is module
    assert module.denoiser._compiled_call_impl is not None  # compiled lazily at its first call
    assert module.first_stage._compiled_call_impl is None
    assert list(module.state_dict()) == keys
    assert maybe_compile(OmegaConf.create({"location": {"compile": False}}), style_diffusion()) is not None
    with pytest.raises(ValueError, match="names no compile_targets; set location.compile=false"):
        maybe_compile(cfg, pl.LightningModule())


def test_fast_defaults_and_the_reference_path_one_override_away(compose_cfg):
    weight = [torch.nn.Parameter(torch.zeros(2))]
    train = compose_cfg("train_diff", [])
    assert instantiate(train.model.optimizer)(weight, lr=1e-3).defaults["fused"] is True
    reference = compose_cfg("train_diff", ["model.optimizer.fused=null"])
    assert not instantiate(reference.model.optimizer)(weight, lr=1e-3).defaults["fused"]

    predict = run_options(compose_cfg("predict_diff", []))
    assert (predict.solver, predict.batched_guidance, predict.shared_trunk) == ("dpm_solver", True, True)
    assert predict.steps <= 10
    paper = run_options(compose_cfg("predict_diff", ["sampler=ddim", "steps=128", "batched_guidance=false"]))
    assert (paper.solver, paper.steps, paper.batched_guidance) == ("ddim", 128, False)
