"""Train a segmentation network on real (+ synthetic) data, then test it with the last and the
best checkpoint. ``python train_seg.py data=flowers data/dataset=[flowers_anno,flowers_syn] ...``"""

import hydra
from omegaconf import DictConfig

import stedm  # noqa: F401  (config resolvers; the heavy imports wait until a run starts)


@hydra.main(config_path="conf", config_name="train_seg", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from stedm.tasks.segmentation import train_segmentation

    train_segmentation(cfg)


if __name__ == "__main__":
    main()
