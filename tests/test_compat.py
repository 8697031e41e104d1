"""What moved keeps working: old module paths, and checkpoints and runs written before a move."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest import compose_in
from stedm.compat import MOVED_MODULES, upgrade_flat, upgrade_model_config, upgrade_qc_report
from stedm.data.pair_folder import SETTINGS
from stedm.resume import identity
from stedm.run import prepare
from stedm.tasks.diffusion import CHOICES_KEY, CONFIG_KEY, train_diffusion
from stedm.tasks.predict import predict_pairs

TRAIN = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "data.samples=8", "trainer.max_steps=2",
         "diffusion.sample_every_n_steps=0", "trainer.enable_progress_bar=false"]
PREDICT = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "sampler=dpm_solver", "steps=3",
           "progress=false", "num_pairs=3"]


@pytest.mark.parametrize("old,new", sorted(MOVED_MODULES.items()))
def test_old_module_paths_import_the_moved_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_target_paths_instantiate():
    loss = instantiate({"_target_": "stedm.losses.ssl.FocalSSLoss"})
    assert type(loss).__module__ == "stedm.losses.finetune"
    source = instantiate({"_target_": "stedm.data.style.AugmentedStyle", "scale": [0.9, 1.1]})
    assert type(source).__module__ == "stedm.data.style_sources"


def _style_sampling_as_written_before(style_sampling: dict) -> dict:
    """A style_sampling group as it was before ``sampler`` became ``source`` (old module path too)."""
    old = {k: v for k, v in style_sampling.items() if k != "source"}
    old["sampler"] = dict(style_sampling["source"], _target_=style_sampling["source"]["_target_"].replace(
        "stedm.data.style_sources.", "stedm.data.style."))
    return old


def _as_written_before_the_move(config: dict) -> dict:
    """A StyleDiffusion config as train_diff.py stored it before the sampling options existed."""
    old = {k: v for k, v in config.items() if k != "sampling"}
    sampling = config["sampling"]
    old.update(sampler=sampling["solver"], sample_steps=10, cfg_scale=sampling["cfg_scale"])
    return old


def test_checkpoint_written_before_the_move_predicts_the_same_pairs(tmp_path):
    cfg = compose_in(tmp_path, "train_diff", TRAIN)
    train_diffusion(cfg)
    run_dir = tmp_path / "results" / "checkpoints" / cfg.run_name
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
    choices = dict(checkpoint[CHOICES_KEY])
    choices["style_sampling"] = _style_sampling_as_written_before(choices["style_sampling"])
    old = dict(checkpoint, **{CONFIG_KEY: _as_written_before_the_move(checkpoint[CONFIG_KEY]), CHOICES_KEY: choices})
    assert "sampling" not in old[CONFIG_KEY] and upgrade_model_config(old[CONFIG_KEY])["sampling"]["steps"] == 10
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "last.ckpt")

    folders = [predict_pairs(compose_in(tmp_path, "predict_diff", [*PREDICT, f"+ckpt_name={ckpt}",
                                                                   f"+predict_dir={name}"]))
               for name, ckpt in (("new", cfg.run_name), ("old", tmp_path / "old" / "last.ckpt"))]
    for i in range(3):
        new_image, old_image = (np.asarray(Image.open(f / f"img_{i:05d}.png")) for f in folders)
        assert np.array_equal(new_image, old_image)

    # a pair folder written before the rename continues where it stopped
    settings_file = folders[1] / SETTINGS
    settings = json.loads(settings_file.read_text())
    settings["style_sampling"] = _style_sampling_as_written_before(settings["style_sampling"])
    settings_file.write_text(json.dumps(settings))
    more = [p for p in PREDICT if not p.startswith("num_pairs=")] + ["num_pairs=4"]
    predict_pairs(compose_in(tmp_path, "predict_diff", [*more, f"+ckpt_name={tmp_path / 'old' / 'last.ckpt'}",
                                                        "+predict_dir=old"]))
    assert (folders[1] / "img_00003.png").is_file()
    assert json.loads(settings_file.read_text())["style_sampling"]["source"]["_target_"].startswith(
        "stedm.data.style_sources.")


@pytest.mark.parametrize("override,named", [
    ("+style_sampling.sampler._target_=stedm.data.style.AugmentedStyle", "style_sampling.sampler -> style_sampling.source"),
    ("+data.sampling.tumour.probability=1.0", "data.sampling -> data.locations"),
    ("+data.dataset.demo_anno.sampling=null", "data.dataset.demo_anno.sampling -> data.dataset.demo_anno.locations"),
])
def test_a_config_file_with_a_renamed_key_is_refused_naming_the_new_key(tmp_path, override, named):
    """A user's own YAML written for an earlier version (here given as an override) is not
    silently ignored: the run refuses it before anything is written."""
    cfg = compose_in(tmp_path, "train_diff", [*TRAIN, override])
    with pytest.raises(ValueError, match=f"renamed.*{named}"):
        prepare(cfg)
    assert not (tmp_path / "results").exists()


def test_identity_of_a_run_written_before_the_move_reads_at_the_new_keys(tmp_path):
    cfg = compose_in(tmp_path, "pretrain_ssl", ["preset=tiny"])
    now = identity(cfg)
    old = {(key.replace("model.noise_schedule.", "model.") if key.startswith("model.noise_schedule.") else key): v
           for key, v in now.items()}
    old["model.sampler"], old["model.sample_steps"] = old.pop("model.sampling.solver"), old.pop("model.sampling.steps")
    assert "model.beta_start" in old and upgrade_flat(old) == {k: v for k, v in now.items()
                                                              if not k.startswith("model.sampling.")
                                                              or k in ("model.sampling.solver", "model.sampling.steps")}
    diffusion = identity(compose_in(tmp_path, "train_diff", ["preset=tiny"]))
    before_rename = {key.replace("style_sampling.source.", "style_sampling.sampler."): value
                     for key, value in diffusion.items()}
    assert "style_sampling.sampler._target_" in before_rename and upgrade_flat(before_rename) == diffusion
    finetune = identity(compose_in(tmp_path, "finetune_ssl", ["preset=tiny", "from_scratch=true"]))
    written_before = {**finetune, "model.loss._target_": "stedm.losses.ssl.FocalSSLoss"}
    assert upgrade_flat(written_before) == finetune


def test_a_qc_report_written_before_the_rename_tabulates_at_the_new_keys():
    from stedm.experiment import QC_KEYS

    old = {"layout_fidelity_iou_fg": 0.61, "ceiling_real_test_iou_fg": 0.83, "style_ratio": 1.2, "pairs": 64}
    upgraded = upgrade_qc_report(old)
    assert {k: upgraded.get(k) for k, _ in QC_KEYS} == {"layout_fidelity_iou_mean": 0.61,
                                                        "ceiling_real_test_iou_mean": 0.83, "style_ratio": 1.2,
                                                        "kid_x1e3_synthetic_vs_real": None}
    assert upgrade_qc_report(upgraded) == upgraded
