"""Standard exports: a finished run writes its final (EMA) weights as safetensors with a model
card; the export loads back equal to the checkpoint's weights, and the .ckpt stays for resuming."""

from __future__ import annotations

import torch

from conftest import compose_in
from stedm.models.cards import read_card
from stedm.models.weights import read_state_dict
from stedm.tasks.diffusion import train_diffusion
from stedm.tasks.predict import load_model, read_checkpoint

TRAIN = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "data.samples=8", "trainer.max_steps=2",
         "diffusion.sample_every_n_steps=0", "trainer.enable_progress_bar=false", "diffusion.ema_decay=0.5"]


def test_train_diff_exports_ema_weights_with_card(tmp_path):
    cfg = compose_in(tmp_path, "train_diff", TRAIN)
    train_diffusion(cfg)
    run = tmp_path / "results" / "runs" / "train_diff" / cfg.run_name
    ckpt_path = tmp_path / "results" / "checkpoints" / cfg.run_name / "last.ckpt"
    assert ckpt_path.is_file()  # kept for resuming
    exported = read_state_dict(run / "final.safetensors")
    checkpoint = read_checkpoint(ckpt_path)
    live = checkpoint["state_dict"]
    ema = load_model(checkpoint).state_dict()  # the EMA weights put in place, as predict_diff samples
    assert exported.keys() == ema.keys()
    for key, value in ema.items():
        assert torch.equal(exported[key], value), key
    assert any(not torch.equal(live[k], ema[k]) for k in ema)  # EMA, not the live weights, were exported
    card = read_card(run / "final.safetensors")
    assert card["task"] == "train_diff" and card["weights_set"] == "ema" and card["run_name"] == cfg.run_name
    assert card["data"]["name"] == "demo" and card["data"]["entries"] == ["demo_anno"]
    assert card["config"]["model"]["denoiser"]["preset"] == "tiny" and card["step"] == 2
    assert card["metrics"] and all(isinstance(v, float) for v in card["metrics"].values())
    provenance = card["provenance"]
    assert len(provenance["git_commit"] or "") == 40 and provenance["packages"]["diffusers"]
    assert card["weights"]["file"] == "final.safetensors" and len(card["weights"]["sha256"]) == 64
