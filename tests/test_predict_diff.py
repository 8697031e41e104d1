"""predict_diff: complete, reproducible, restartable synthetic sets that never overwrite others."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import compose_in
from stedm.data.pair_folder import read_manifest
from stedm.data.datasets.synthetic import SyntheticPairs
from stedm.tasks.diffusion import train_diffusion
from stedm.tasks.predict import PairSource, predict_pairs

ROOT = Path(__file__).resolve().parents[1]
# location.precision pinned: pairs compared across runs are the same whatever the CPU
TRAIN = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "data.samples=8", "trainer.max_steps=2",
         "diffusion.sample_every_n_steps=0", "trainer.enable_progress_bar=false"]
PREDICT = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "sampler=dpm_solver", "steps=3", "progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("stedm")
    cfg = compose_in(root, "train_diff", TRAIN)
    train_diffusion(cfg)
    return root, cfg.run_name


def predict(root, run_name, *extra):
    cfg = compose_in(root, "predict_diff", [*PREDICT, f"+ckpt_name={run_name}", *extra])
    return cfg, predict_pairs(cfg)


def pair_files(folder: Path) -> dict[str, bytes]:
    return {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(folder.glob("*_*.png"))}


def test_pairs_manifest_and_masks_equal_layouts(trained):
    root, run = trained
    cfg, folder = predict(root, run, "+predict_dir=a", "num_pairs=5", "batch_size=2",
                          "style_sampling=augmented")  # the training one: accepted
    manifest = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in manifest) == list(range(5))
    for record in manifest:
        assert {"layout_source", "layout_case", "style_source", "style_case", "seed", "sampler", "steps",
                "cfg_scale", "checkpoint"} <= set(record)
    source = PairSource(cfg, with_style=True)
    for i in range(5):
        written = np.asarray(Image.open(folder / f"seg_{i:05d}.png"))
        assert np.array_equal(written, source(i)["mask"].numpy())
        image = np.asarray(Image.open(folder / f"img_{i:05d}.png"))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # the folder reads back as a *_syn entry
    syn = SyntheticPairs("demo_syn", root=folder.parent, folder_name="a", num_classes=3)
    assert len(syn) == 5 and syn[0]["meta"]["layout_case"] == manifest[0]["layout_case"]


def test_batch_size_does_not_change_a_pair(trained):
    root, run = trained
    _, one = predict(root, run, "+predict_dir=b1", "num_pairs=4", "batch_size=1")
    _, four = predict(root, run, "+predict_dir=b4", "num_pairs=4", "batch_size=4")
    for i in range(4):
        a = np.asarray(Image.open(one / f"img_{i:05d}.png")).astype(int)
        b = np.asarray(Image.open(four / f"img_{i:05d}.png")).astype(int)
        assert np.abs(a - b).max() <= 2  # stated tolerance: 2/255 per pixel


def test_changed_settings_are_refused_unless_overwrite(trained):
    root, run = trained
    predict(root, run, "+predict_dir=c", "num_pairs=2")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        predict(root, run, "+predict_dir=c", "num_pairs=2", "cfg_scale=3.0")
    _, folder = predict(root, run, "+predict_dir=c", "num_pairs=2", "cfg_scale=3.0", "overwrite=true")
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [r["cfg_scale"] for r in records] == [3.0, 3.0]


def test_killed_run_restarts_to_the_uninterrupted_result(trained):
    root, run = trained
    _, reference = predict(root, run, "+predict_dir=whole", "num_pairs=6", "batch_size=2")
    args = [sys.executable, "predict_diff.py", *PREDICT, f"+ckpt_name={run}", "+predict_dir=killed", "num_pairs=6",
            "batch_size=2", f"location.data_dir={root / 'data'}", f"location.result_dir={root / 'results'}"]
    manifest = root / "data" / "syn_data" / "killed" / "manifest.jsonl"
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if manifest.is_file() and len(manifest.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(manifest.read_text().splitlines())
    assert 2 <= done < 6, "the run should be killed part-way"
    _, folder = predict(root, run, "+predict_dir=killed", "num_pairs=6", "batch_size=2")
    assert pair_files(folder) == pair_files(reference)
    assert len((folder / "manifest.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("bad,key", [("num_pairs=-3", "num_pairs=-3"), ("num_pairs=0", "num_pairs=0"),
                                     ("steps=0", "steps=0"), ("batch_size=0", "batch_size=0"),
                                     ("cfg_scale=-1.0", "cfg_scale=-1.0"), ("rescale=2.0", "rescale=2.0"),
                                     ("sampler=euler", "sampler=euler"),
                                     ("sampler=ddim", "sampler=ddim steps=3 sampling.spacing=None")])  # paper spacing: no
def test_impossible_settings_are_refused_before_any_folder(trained, bad, key):
    root, run = trained
    with pytest.raises(ValueError, match=f"^{re.escape(key)}"):
        predict(root, run, "+predict_dir=never", bad)
    assert not (root / "data" / "syn_data" / "never").exists()


@pytest.mark.parametrize("given,trained_with", [("style_agg=max", "style_agg=mean"), ("preset=paper", "preset=tiny"),
                                                ("diffusion=paper", "diffusion=tiny")])
def test_model_choices_contradicting_the_checkpoint_are_refused(trained, given, trained_with):
    root, run = trained
    with pytest.raises(ValueError, match=rf"^{re.escape(given)}: .*trained with {re.escape(trained_with)}"):
        predict(root, run, "+predict_dir=contradiction", given)
    assert not (root / "data" / "syn_data" / "contradiction").exists()


def test_choices_equal_to_the_checkpoint_are_accepted(trained):
    root, run = trained  # as the seed predict command passes them
    _, folder = predict(root, run, "+predict_dir=same", "num_pairs=1", "style_agg=mean", "diffusion=tiny",
                        "diffusion.sample_every_n_steps=0", "style_sampling=augmented")
    assert sorted(read_manifest(folder)) == [0]


def test_other_style_sampling_needs_opt_in_and_is_recorded(trained):
    root, run = trained
    for other in ("style_sampling=mp", "style_sampling=none"):
        with pytest.raises(ValueError, match=rf"^{other}: .*trained with style_sampling=augmented.*"
                                             "allow_style_sampling_change=true"):
            predict(root, run, "+predict_dir=styles", other)
    _, folder = predict(root, run, "+predict_dir=styles", "num_pairs=2", "style_sampling=none",
                        "allow_style_sampling_change=true")
    settings = json.loads((folder / ".stedm_settings.json").read_text())
    assert settings["style_sampling"]["name"] == "none" and settings["style_sampling_trained"]["name"] == "augmented"
    records = read_manifest(folder)
    assert sorted(records) == [0, 1] and "style_case" not in records[0]  # no style images drawn
    _, default = predict(root, run, "+predict_dir=styles_default", "num_pairs=2")
    assert pair_files(folder).keys() == pair_files(default).keys() and pair_files(folder) != pair_files(default)
