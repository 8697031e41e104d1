"""``pretrain_ssl.py``: GenSelfDiff diffusion pretraining. (``finetune_ssl.py`` is a segmentation
run, :func:`stedm.tasks.segmentation.train_segmentation`, with the pretrained U-Net as network.)"""

from __future__ import annotations

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from stedm.run import build_datamodule, build_trainer, fit, prepare


def pretrain(cfg: DictConfig) -> pl.Trainer:
    ctx = prepare(cfg)
    datamodule = build_datamodule(cfg, ctx, eval_splits=(), with_style=False)
    model = instantiate(cfg.model, lr=ctx.lr)
    # Pretraining pools unlabelled data, which has no validation split: no validation loop.
    trainer = build_trainer(cfg, ctx, limit_val_batches=0)
    fit(cfg, ctx, trainer, model, datamodule)
    return trainer
