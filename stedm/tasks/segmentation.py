"""``train_seg.py`` and ``finetune_ssl.py``: train a Segmenter, then test it with the last and
the best checkpoint (metrics_<tag>.json + per_case_<tag>.csv in the run directory)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from stedm.resume import LAST
from stedm.run import build_datamodule, build_trainer, fit, prepare

log = logging.getLogger(__name__)


def train_segmentation(cfg: DictConfig) -> dict[str, list[dict]]:
    ctx = prepare(cfg)
    datamodule = build_datamodule(cfg, ctx, eval_splits=("val", "test"), with_style=False)
    model = instantiate(cfg.model, lr=ctx.lr, output_dir=str(ctx.run_dir))
    trainer = build_trainer(cfg, ctx)
    fit(cfg, ctx, trainer, model, datamodule)
    results = {}
    # Paths first: testing restores the callbacks' state from the checkpoint it tests.
    paths = {tag: checkpoint_for(tag, trainer, ctx.checkpoint_dir) for tag in cfg.get("test_checkpoints") or []}
    for tag, path in paths.items():
        if path is None:
            log.warning("no '%s' checkpoint (checkpoint.monitor=%s): skipping its test", tag, cfg.checkpoint.monitor)
            continue
        model.test_tag = tag
        results[tag] = trainer.test(model, datamodule=datamodule, ckpt_path=path, weights_only=True)
    return results


def checkpoint_for(tag: str, trainer, checkpoint_dir: Path) -> str | None:
    if tag == "last":
        path = checkpoint_dir / LAST
        return str(path) if path.is_file() else None
    if tag == "best":
        return getattr(trainer.checkpoint_callback, "best_model_path", None) or None  # set by checkpoint.monitor
    raise ValueError(f"test_checkpoints: unknown entry '{tag}'; use last and/or best")
