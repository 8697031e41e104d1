"""Train the style-conditioned latent diffusion model (STEDM).
``python train_diff.py location=cluster data=flowers style_sampling=augmented style_agg=mean data.class_train_samples=3``"""

import hydra
from omegaconf import DictConfig

import stedm  # noqa: F401  (config resolvers; the heavy imports wait until a run starts)


@hydra.main(config_path="conf", config_name="train_diff", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from stedm.tasks.diffusion import train_diffusion

    train_diffusion(cfg)


if __name__ == "__main__":
    main()
