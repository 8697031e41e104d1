"""Synthesise image/mask pairs with a trained STEDM checkpoint: layouts from the first entry,
styles from the second. ``python predict_diff.py ... +ckpt_name=RUN_NAME +predict_dir=NAME``"""

import hydra
from omegaconf import DictConfig

import stedm  # noqa: F401  (config resolvers; the heavy imports wait until a run starts)


@hydra.main(config_path="conf", config_name="predict_diff", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from stedm.tasks.predict import predict_pairs

    predict_pairs(cfg)


if __name__ == "__main__":
    main()
