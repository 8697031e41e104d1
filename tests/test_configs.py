"""Every option of every config group composes with every script that uses it, and the
objects it names instantiate (networks on the meta device, so paper sizes stay cheap)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
SCRIPTS = ["train_diff", "predict_diff", "train_seg", "pretrain_ssl", "finetune_ssl"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def groups_of(script: str) -> list[str]:
    defaults = OmegaConf.load(CONF / f"{script}.yaml").defaults
    names = [next(iter(d)) for d in defaults if isinstance(d, dict) or OmegaConf.is_dict(d)]
    return [g for g in names if g not in ("data/entries",) and (CONF / g).is_dir()]


CASES = [(s, g, o) for s in SCRIPTS if (CONF / f"{s}.yaml").is_file() for g in groups_of(s) for o in options(g)]


@pytest.mark.parametrize("script,group,option", CASES, ids=[f"{s}-{g}={o}" for s, g, o in CASES])
def test_option_composes_and_resolves(compose_cfg, script, group, option):
    cfg = compose_cfg(script, [f"{group}={option}"])
    OmegaConf.resolve(cfg)  # every interpolation points somewhere
    assert cfg.seed is not None and cfg.run_name


def test_style_sources_instantiate(compose_cfg):
    for option in options("style_sampling"):
        sampler = instantiate(compose_cfg("train_diff", [f"style_sampling={option}"]).style_sampling.source)
        assert sampler.num_images == compose_cfg("train_diff", [f"style_sampling={option}"]).style_sampling.num_images


@pytest.mark.parametrize("preset", ["tiny", "paper"])
@pytest.mark.parametrize("agg", options("style_agg"))
def test_diffusion_models_instantiate(compose_cfg, preset, agg):
    from stedm.tasks.diffusion import build_model, model_config

    cfg = compose_cfg("train_diff", [f"preset={preset}", f"style_agg={agg}", "style_sampling=mp", "data.patch_size=64",
                                     "diffusion.first_stage.allow_random=true"])  # no weights cache here
    with torch.device("meta"):
        model = build_model(model_config(cfg), lr=1e-4)
    assert (model.style.encoder is None) == (agg == "svit")


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_segmenters_instantiate(compose_cfg, preset):
    cfg = compose_cfg("train_seg", [f"preset={preset}"])
    model = instantiate(cfg.model, lr=1e-3)
    assert model.hparams.num_classes == cfg.segmenter.classes
