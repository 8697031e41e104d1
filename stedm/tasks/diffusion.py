"""``train_diff.py``: train the style-conditioned latent diffusion model (STEDM)."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from stedm.compat import upgrade_model_config
from stedm.run import build_datamodule, build_trainer, fit, prepare

log = logging.getLogger(__name__)

CONFIG_KEY = "stedm_model_config"
CHOICES_KEY = "stedm_choices"  # the resolved style_agg, style_sampling, preset and diffusion of the run
CHOICES = ("style_agg", "style_sampling", "preset", "diffusion")
FIRST_STAGE_KEY = "stedm_first_stage"  # the architecture of the trained model's first stage (its weights are in state_dict)


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
        from stedm.models.first_stage import DiffusersFirstStage, architecture

        checkpoint[CONFIG_KEY] = self.config
        if self.choices is not None:
            checkpoint[CHOICES_KEY] = self.choices
        if isinstance(getattr(module, "first_stage", None), DiffusersFirstStage):
            checkpoint[FIRST_STAGE_KEY] = architecture(module.first_stage.model)


def prediction_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The stored model config to rebuild the model for prediction: its first stage built from the
    architecture the checkpoint records, without reading ``weights_path`` (the checkpoint's
    state_dict holds the first-stage weights, so the cache or file it was trained from need not
    exist any more). Checkpoints written before the architecture was recorded keep their config;
    keys that moved since the checkpoint was written are read at their new place (:mod:`stedm.compat`)."""
    config = upgrade_model_config(checkpoint[CONFIG_KEY])  # keys an earlier version kept elsewhere
    stored, built = config.get("first_stage") or {}, checkpoint.get(FIRST_STAGE_KEY)
    if built is None or stored.get("kind") == "identity":
        return config
    first_stage = {"_target_": "stedm.models.first_stage.build_first_stage", "kind": built["kind"], **built["config"]}
    return {**config, "first_stage": first_stage}


RANDOM_OPT_IN = "diffusion.first_stage.allow_random=true"


def check_first_stage(first_stage: DictConfig | dict) -> bool:
    """Refuse, before any work, a non-identity first stage that would start from random weights
    (``weights_path`` null, or a cache name the cache does not hold) unless ``allow_random``:
    the error gives the ways forward. Returns whether the first stage is random (opted in,
    logged loudly)."""
    from stedm.weights_cache import is_available, ways_forward

    kind, value = first_stage.get("kind"), first_stage.get("weights_path")
    if kind == "identity" or (value is not None and is_available(str(value))):
        return False
    name = str(value) if value is not None else "ldm-vq-f4"
    why = ("diffusion.first_stage.weights_path is null, so the autoencoder would be random" if value is None else
           f"diffusion.first_stage.weights_path={value!r} is neither an existing path nor in the weights cache")
    if not first_stage.get("allow_random"):
        raise FileNotFoundError(
            f"diffusion.first_stage.kind={kind}: {why}, and diffusion in the latent space of an untrained "
            f"autoencoder learns nothing useful. To get weights, {ways_forward(name, 'diffusion.first_stage.weights_path')}. "
            f"For a smoke test or benchmark only: {RANDOM_OPT_IN}")
    log.warning("!" * 60 + "\nRANDOM FIRST STAGE (%s): %s; the checkpoint records it and predict_diff.py refuses "
                "it without the same opt-in. Use this for smoke tests and benchmarks only.\n" + "!" * 60,
                RANDOM_OPT_IN, why)
    return True


def check_random_first_stage(cfg: DictConfig, checkpoint: dict[str, Any], path: Any) -> DictConfig:
    """predict_diff: refuse a checkpoint trained with a random first stage (``allow_random``)
    unless ``+diffusion.first_stage.allow_random=true`` is given too. Returns ``cfg`` with a
    ``diffusion`` that holds nothing but this opt-in removed (the checkpoint's is used)."""
    stored = (checkpoint.get(CONFIG_KEY) or {}).get("first_stage") or {}
    given = OmegaConf.select(cfg, "diffusion.first_stage.allow_random", default=None)
    if stored.get("allow_random") and stored.get("kind") != "identity" and not given:
        raise ValueError(f"ckpt_name: {path} was trained with a random first stage ({RANDOM_OPT_IN}: a smoke test "
                         "or benchmark), so its pairs are not meaningful; pass +diffusion.first_stage.allow_random=true "
                         "to sample from it anyway")
    if given is not None and OmegaConf.to_container(cfg.diffusion) == {"first_stage": {"allow_random": given}}:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.diffusion = None
    if given and stored.get("allow_random"):
        log.warning("sampling from %s, trained with a RANDOM first stage (%s)", path, RANDOM_OPT_IN)
    return cfg


def train_diffusion(cfg: DictConfig) -> pl.Trainer:
    check_first_stage(cfg.diffusion.first_stage)
    ctx = prepare(cfg)
    datamodule = build_datamodule(cfg, ctx, eval_splits=(), with_style=True)
    config = model_config(cfg)
    model = build_model(config, ctx.lr)
    trainer = build_trainer(cfg, ctx)
    trainer.callbacks.append(StoreModelConfig(config, cfg))
    fit(cfg, ctx, trainer, model, datamodule)
    return trainer
