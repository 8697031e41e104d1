"""GenSelfDiff-HIS pretraining: a U-Net learns to denoise unlabelled patches; writes
``<run dir>/pretrained_unet.pt``. ``python pretrain_ssl.py data=glas``"""

import hydra
from omegaconf import DictConfig

import stedm  # noqa: F401  (config resolvers; the heavy imports wait until a run starts)


@hydra.main(config_path="conf", config_name="pretrain_ssl", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from stedm.tasks.ssl import pretrain

    pretrain(cfg)


if __name__ == "__main__":
    main()
