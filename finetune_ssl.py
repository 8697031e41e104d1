"""GenSelfDiff-HIS fine-tuning: the pretrained U-Net (new head, t = 0) trained end to end as a
segmenter. ``python finetune_ssl.py data=glas pretrained=RUN_DIR/pretrained_unet.pt``
(``from_scratch=true``: the random-init baseline)."""

import hydra
from omegaconf import DictConfig

import stedm  # noqa: F401  (config resolvers; the heavy imports wait until a run starts)


@hydra.main(config_path="conf", config_name="finetune_ssl", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from stedm.tasks.segmentation import train_segmentation

    train_segmentation(cfg)


if __name__ == "__main__":
    main()
