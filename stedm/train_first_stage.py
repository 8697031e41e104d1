"""``python -m stedm.train_first_stage data=...``: train an autoencoder (first stage) on your own
data with the registry, DataModule, resume and run identity of every other script; the run's
``final.safetensors`` (with its model card) is a ``diffusion.first_stage.weights_path``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import stedm  # noqa: F401  (config resolvers)


def train_first_stage(cfg: DictConfig):
    from hydra.utils import instantiate

    from stedm.run import build_datamodule, build_trainer, fit, prepare

    ctx = prepare(cfg)
    datamodule = build_datamodule(cfg, ctx, eval_splits=("val",), with_style=False)
    model = instantiate(cfg.model, lr=ctx.lr, _convert_="partial")
    trainer = build_trainer(cfg, ctx)
    fit(cfg, ctx, trainer, model, datamodule)
    return trainer


@hydra.main(config_path="../conf", config_name="train_first_stage", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train_first_stage(cfg)


if __name__ == "__main__":
    main()
