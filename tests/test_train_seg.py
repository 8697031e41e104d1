"""train_seg through its real config: real-only and real + synthetic, both test passes."""

from __future__ import annotations

import json

import pandas as pd

from conftest import write_synthetic_pairs
from stedm.tasks.segmentation import train_segmentation

TINY = ["preset=tiny", "data.patch_size=32", "data.samples=16", "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def check_run(cfg):
    from pathlib import Path

    run = Path(cfg.location.result_dir) / "runs" / "train_seg" / cfg.run_name
    ckpts = Path(cfg.location.result_dir) / "checkpoints" / cfg.run_name
    assert (ckpts / "last.ckpt").is_file() and list(ckpts.glob("best-*.ckpt"))
    losses = pd.read_csv(run / "logs" / "metrics.csv")["train/loss_step"].dropna()
    assert len(losses) > 0 and losses.abs().lt(1e3).all()
    for tag in ("last", "best"):
        metrics = json.loads((run / f"metrics_{tag}.json").read_text())
        assert 0.0 <= metrics["iou_fg"] <= 1.0 and metrics["n_cases"] == 4
        cases = pd.read_csv(run / f"per_case_{tag}.csv")
        assert len(cases) == 4 and cases["iou_fg"].between(0, 1).all()


def test_real_only_run_needs_no_extra_flags(compose_cfg):
    cfg = compose_cfg("train_seg", TINY)
    results = train_segmentation(cfg)
    assert set(results) == {"last", "best"}
    check_run(cfg)


def test_real_plus_synthetic(compose_cfg, tmp_path):
    write_synthetic_pairs(tmp_path / "data" / "syn_data" / "mine", n=4, size=32)
    cfg = compose_cfg("train_seg", [*TINY, "data/dataset=[demo_anno,demo_syn]", "data.ratios=[0.5,0.5]",
                                    "data.dataset.demo_syn.folder_name=mine"])
    assert "demo_syn@mine" in cfg.run_name
    train_segmentation(cfg)
    check_run(cfg)
