"""pretrain_ssl then finetune_ssl through their real configs, on the demo data."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import instantiate

from stedm.models.cards import read_card
from stedm.models.ssl_unet import load_pretrained_unet
from stedm.models.weights import read_state_dict
from stedm.tasks.segmentation import train_segmentation
from stedm.tasks.ssl import pretrain

TINY = ["preset=tiny", "data.patch_size=32", "data.samples=8", "trainer.enable_progress_bar=false"]


def test_pretrain_then_finetune_and_the_scratch_baseline(compose_cfg):
    cfg = compose_cfg("pretrain_ssl", [*TINY, "trainer.max_epochs=1"])
    assert list(cfg.data.dataset) == ["demo_unanno", "demo_anno"]  # every image, labelled or not
    pretrain(cfg)
    weights = Path(cfg.location.result_dir) / "runs" / "pretrain_ssl" / cfg.run_name / "pretrained_unet.pt"
    assert weights.is_file()
    run = weights.parent  # the same weight sets as safetensors + card; the run export is the EMA
    for which in ("ema", "live"):
        a, b = load_pretrained_unet(weights, which)[1], load_pretrained_unet(run / "pretrained_unet.safetensors", which)[1]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final, card = read_state_dict(run / "final.safetensors"), read_card(run / "final.safetensors")
    assert card["weights_set"] == "ema" and card["model"]["ssl_unet"] == load_pretrained_unet(weights)[0]
    ema = load_pretrained_unet(weights, "ema")[1]
    assert all(torch.equal(final[f"net.{k}"], v) for k, v in ema.items())

    finetune = compose_cfg("finetune_ssl", [*TINY, "trainer.max_epochs=1", f"pretrained={weights}"])
    net = instantiate(finetune.model.net)
    _, pretrained = load_pretrained_unet(weights)
    own = net.unet.state_dict()
    differs = sorted({k.split(".")[0] for k, v in pretrained.items() if k not in own or not torch.equal(own[k], v)})
    assert differs == ["head"]  # everything but the replaced head comes from pretraining
    train_segmentation(finetune)
    scratch = compose_cfg("finetune_ssl", [*TINY, "trainer.max_epochs=1", "from_scratch=true"])
    assert scratch.run_name != finetune.run_name and "scratch" in scratch.run_name
    train_segmentation(scratch)
    for run in (finetune, scratch):
        metrics = json.loads((Path(run.location.result_dir) / "runs" / "finetune_ssl" / run.run_name /
                              "metrics_last.json").read_text())
        assert 0 <= metrics["dice_fg"] <= 1 and "hd95" in metrics and "aji" in metrics


def test_finetune_chooses_the_exported_weight_set_and_its_run_name_says_which(compose_cfg, tmp_path):
    from stedm.models.ssl_unet import build_ssl_unet, save_pretrained_unet

    torch.manual_seed(0)
    ema, live = build_ssl_unet("tiny"), build_ssl_unet("tiny")
    weights = tmp_path / "pretrained_unet.pt"
    save_pretrained_unet(weights, ema.config, ema.state_dict(), live=live.state_dict())
    names = set()
    for choice, source in ((None, ema), ("ema", ema), ("live", live)):
        cfg = compose_cfg("finetune_ssl", [*TINY, f"pretrained={weights}",
                                           *([f"pretrained_weights={choice}"] if choice else [])])
        assert f"-pretrained_{choice or 'ema'}-" in cfg.run_name
        names.add(cfg.run_name)
        net = instantiate(cfg.model.net).unet.state_dict()
        assert all(torch.equal(net[k], v) for k, v in source.state_dict().items() if not k.startswith("head."))
    assert len(names) == 2  # ema (the default) and live: two runs, never one continuing the other
