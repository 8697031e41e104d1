"""predict_diff takes the first stage's weights from the train_diff checkpoint: the file (or cache
entry) it was trained from may be gone (the random-first-stage refusal, which reads the stored
config, is tested in test_weights_refusal.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_in
from stedm.models.cards import write_weights
from stedm.models.first_stage import architecture, build_model
from stedm.tasks.diffusion import FIRST_STAGE_KEY, train_diffusion
from stedm.tasks.predict import predict_pairs

TINY_KL = dict(block_out_channels=[8, 16], norm_num_groups=4, latent_channels=3, layers_per_block=1,
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
TRAIN = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "data.samples=8", "trainer.max_steps=1",
         "diffusion.sample_every_n_steps=0", "trainer.enable_progress_bar=false", "diffusion.first_stage.kind=kl"]
PREDICT = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "steps=2", "progress=false",
           "num_pairs=2"]


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEDM_WEIGHTS_DIR", str(tmp_path / "empty-cache"))


def pairs(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png")) if p.name.startswith(("img_", "seg_"))]


def test_predict_needs_no_first_stage_file_once_trained(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "ae" / "final.safetensors"
    model = build_model("kl", TINY_KL)
    write_weights(weights, model.state_dict(), {"task": "train_first_stage", "model": {"first_stage": architecture(model)}})
    cfg = compose_in(tmp_path, "train_diff", [*TRAIN, f"diffusion.first_stage.weights_path={weights}"])
    train_diffusion(cfg)
    ckpt = tmp_path / "results" / "checkpoints" / cfg.run_name / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)[FIRST_STAGE_KEY]["config"]["block_out_channels"] == [8, 16]
    before = predict_pairs(compose_in(tmp_path, "predict_diff", [*PREDICT, f"+ckpt_name={cfg.run_name}",
                                                                 "+predict_dir=before"]))
    weights.rename(weights.with_name("moved.safetensors"))
    after = predict_pairs(compose_in(tmp_path, "predict_diff", [*PREDICT, f"+ckpt_name={cfg.run_name}",
                                                                "+predict_dir=after"]))
    a, b = pairs(before), pairs(after)
    assert len(a) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

