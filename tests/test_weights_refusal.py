"""No silent random autoencoder: train_diff refuses a random first stage before any work, the
opt-in is recorded in the checkpoint, and predict_diff refuses such a checkpoint without it."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_in
from stedm.tasks.diffusion import CONFIG_KEY, train_diffusion
from stedm.tasks.predict import predict_pairs

TINY_KL = ["diffusion.first_stage.kind=kl", "+diffusion.first_stage.block_out_channels=[8]",
           "+diffusion.first_stage.norm_num_groups=4", "+diffusion.first_stage.latent_channels=3",
           "+diffusion.first_stage.layers_per_block=1",
           "+diffusion.first_stage.down_block_types=[DownEncoderBlock2D]",
           "+diffusion.first_stage.up_block_types=[UpDecoderBlock2D]"]
TRAIN = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "data.samples=8", "trainer.max_steps=1",
         "diffusion.sample_every_n_steps=0", "trainer.enable_progress_bar=false", *TINY_KL]
PREDICT = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "steps=2", "progress=false",
           "num_pairs=1"]


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEDM_WEIGHTS_DIR", str(tmp_path / "empty-cache"))


def test_paper_preset_with_empty_cache_refused_before_any_work(tmp_path):
    cfg = compose_in(tmp_path, "train_diff", ["preset=paper"])
    assert cfg.diffusion.first_stage.weights_path == "ldm-vq-f4"
    with pytest.raises(FileNotFoundError) as err:
        train_diffusion(cfg)
    message = str(err.value)
    for way in ("python -m stedm.weights fetch ldm-vq-f4", "diffusion.first_stage.weights_path=/path",
                "python -m stedm.train_first_stage", "diffusion.first_stage.allow_random=true"):
        assert way in message
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.ckpt"))
    assert not (tmp_path / "results" / "runs").exists()  # refused before prepare() made the run folder


def test_null_weights_refused_and_opt_in_recorded_then_predict_refuses(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="weights_path is null"):
        train_diffusion(compose_in(tmp_path, "train_diff", TRAIN))
    cfg = compose_in(tmp_path, "train_diff", [*TRAIN, "diffusion.first_stage.allow_random=true"])
    with caplog.at_level("WARNING"):
        train_diffusion(cfg)
    assert "RANDOM FIRST STAGE" in caplog.text
    ckpt = torch.load(tmp_path / "results" / "checkpoints" / cfg.run_name / "last.ckpt", weights_only=True)
    assert ckpt[CONFIG_KEY]["first_stage"]["allow_random"] is True
    with pytest.raises(ValueError, match=r"random first stage .*\+diffusion\.first_stage\.allow_random=true"):
        predict_pairs(compose_in(tmp_path, "predict_diff", [*PREDICT, f"+ckpt_name={cfg.run_name}", "+predict_dir=a"]))
    assert not (tmp_path / "data" / "syn_data" / "a").exists()
    folder = predict_pairs(compose_in(tmp_path, "predict_diff", [*PREDICT, f"+ckpt_name={cfg.run_name}",
                                                                 "+predict_dir=b", "+diffusion.first_stage.allow_random=true"]))
    assert (folder / "img_00000.png").is_file()
