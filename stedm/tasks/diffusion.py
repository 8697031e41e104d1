"""``train_diff.py``: train the style-conditioned latent diffusion model (STEDM)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stedm.run import build_datamodule, build_trainer, fit, prepare

CONFIG_KEY = "stedm_model_config"
CHOICES_KEY = "stedm_choices"  # the resolved style_agg, style_sampling, preset and diffusion of the run
CHOICES = ("style_agg", "style_sampling", "preset", "diffusion")


def model_config(cfg: DictConfig) -> DictConfig:
    """``cfg.model`` resolved, with the style path fitted to the style choices.

    ``style_sampling=none``: no style module and a denoiser without style block (so DDP finds
    no unused parameters); ``style_agg=svit``: the set-ViT replaces the encoder.
    """
    model = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    if int(cfg.style_sampling.num_images) == 0:
        model.style = None
        model.denoiser.style_injection = None
    else:
        model.denoiser.style_injection = cfg.diffusion.style_injection
        if not cfg.style_agg.use_encoder:
            model.style.encoder = None
    return model


def build_model(config: DictConfig | dict, lr: float | None) -> pl.LightningModule:
    return instantiate(config, lr=lr if lr is not None else 0.0, _convert_="partial")


class StoreModelConfig(pl.Callback):
    """Put the model's resolved config into every checkpoint: prediction rebuilds the exact model.
    With ``choices`` (the run's config) also the choices it was built from (:data:`CHOICES`), so
    that prediction can check its own against them."""

    def __init__(self, config: DictConfig, choices: DictConfig | None = None) -> None:
        self.config = OmegaConf.to_container(config, resolve=True)
        self.choices = None if choices is None else {
            key: OmegaConf.to_container(choices[key], resolve=True) for key in CHOICES}

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config
        if self.choices is not None:
            checkpoint[CHOICES_KEY] = self.choices


def train_diffusion(cfg: DictConfig) -> pl.Trainer:
    ctx = prepare(cfg)
    datamodule = build_datamodule(cfg, ctx, eval_splits=(), with_style=True)
    config = model_config(cfg)
    model = build_model(config, ctx.lr)
    trainer = build_trainer(cfg, ctx)
    trainer.callbacks.append(StoreModelConfig(config, cfg))
    fit(cfg, ctx, trainer, model, datamodule)
    return trainer
