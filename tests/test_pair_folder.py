"""A pair folder holds pairs of one setting only, survives kills, and is readable by the group."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_in
from stedm.data.pair_folder import SETTINGS, read_manifest
from stedm.data.datasets.synthetic import SyntheticPairs
from stedm.tasks.diffusion import train_diffusion
from stedm.tasks.predict import predict_pairs

TRAIN = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "data.samples=8", "trainer.max_steps=2",
         "diffusion.sample_every_n_steps=0", "trainer.enable_progress_bar=false"]
PREDICT = ["preset=tiny", "data.patch_size=32", "location.precision=32-true", "sampler=dpm_solver", "steps=3",
           "progress=false", "num_pairs=2", "batch_size=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny checkpoint, a copy of it elsewhere, one with other weights, and a folder of pairs."""
    root = tmp_path_factory.mktemp("pairs")
    cfg = compose_in(root, "train_diff", TRAIN)
    train_diffusion(cfg)
    checkpoints = root / "results" / "checkpoints"
    shutil.copytree(checkpoints / cfg.run_name, checkpoints / "copy")
    other = torch.load(checkpoints / cfg.run_name / "last.ckpt", weights_only=True)
    name = next(iter(other["state_dict"]))
    other["state_dict"][name] = other["state_dict"][name] + 1.0
    (checkpoints / "other").mkdir()
    torch.save(other, checkpoints / "other" / "last.ckpt")
    predict(root, cfg.run_name, "+predict_dir=base")
    return root, cfg.run_name


def predict(root: Path, run: str, *extra: str) -> Path:
    return predict_pairs(compose_in(root, "predict_diff", [*PREDICT, f"+ckpt_name={run}", *extra]))


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(folder.glob("*_*.png"))}


@pytest.mark.parametrize("change,setting", [
    (["seed=1"], "seed: 0 -> 1"),
    (["steps=4"], "steps: 3 -> 4"),
    (["spacing=trailing"], "spacing: None -> 'trailing'"),
    (["sampler=ddim", "spacing=linspace"], "sampler: 'dpm_solver' -> 'ddim'"),
    (["cfg_scale=2.0"], "cfg_scale: 1.5 -> 2.0"),
    (["rescale=0.3"], "rescale: 0.7 -> 0.3"),
    (["guidance_mode=diffusers"], "guidance_mode: 'stedm' -> 'diffusers'"),
    (["data.augment.flips=false"], "data_augment.flips: True -> False"),
    (["data.patch_size=16"], "patch_size: 32 -> 16"),
    (["data.class_train_samples=3"], "data.demo_anno.class_train_samples: 4 -> 3"),
    (["style_sampling=augmented", "style_sampling.source.rotate=90.0", "allow_style_sampling_change=true"],
     "style_sampling.source.rotate: 360.0 -> 90.0"),
    (["ckpt_name=other"], "checkpoint_sha256: "),
])
def test_each_changed_setting_is_refused_by_name(trained, change, setting):
    root, run = trained
    folder = root / "data" / "syn_data" / "base"
    before = pngs(folder)
    if change == ["ckpt_name=other"]:  # the same run, other weights
        run, change = "other", []
    with pytest.raises(FileExistsError) as caught:
        predict(root, run, "+predict_dir=base", *change)
    message = str(caught.value)
    assert setting in message
    assert "+predict_dir" in message and "overwrite=true" in message
    assert pngs(folder) == before


def test_same_content_elsewhere_and_faster_guidance_extend_a_folder(trained):
    root, run = trained
    predict(root, run, "+predict_dir=extend")
    predict(root, "copy", "+predict_dir=extend", "num_pairs=3")  # same checkpoint content, another path
    folder = predict(root, run, "+predict_dir=extend", "num_pairs=4", "batched_guidance=false", "shared_trunk=false")
    assert sorted(read_manifest(folder)) == [0, 1, 2, 3]


def test_cut_short_last_manifest_line_is_redone(trained):
    root, run = trained
    reference = predict(root, run, "+predict_dir=whole", "num_pairs=3")
    folder = predict(root, run, "+predict_dir=cut", "num_pairs=3")
    manifest = folder / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:2]) + lines[2][:17])  # killed while writing the third record
    (folder / "img_00002.png").unlink()
    assert sorted(read_manifest(folder)) == [0, 1]  # what train_seg.py reads meanwhile
    assert len(SyntheticPairs("demo_syn", root=folder.parent, folder_name="cut", num_classes=3)) == 2
    predict(root, run, "+predict_dir=cut", "num_pairs=3")
    assert [json.loads(line)["index"] for line in manifest.read_text().splitlines()] == [0, 1, 2]
    assert pngs(folder) == pngs(reference)
    # a broken line that is not the last is an error naming the file and line
    manifest.write_text(lines[0] + "{oops\n" + lines[2])
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: not valid JSON"):
        read_manifest(folder)


def test_leftover_temporaries_are_removed_and_cut_short_settings_named(trained):
    root, run = trained
    folder = root / "data" / "syn_data" / "tmp"
    folder.mkdir(parents=True)
    (folder / f".{SETTINGS}.1a2b3c4d.tmp").write_text("{")  # a first run killed while writing its settings
    predict(root, run, "+predict_dir=tmp")
    leftovers = [folder / ".img_00001.k2j3h4.png.tmp", folder / ".seg_00002.1a2b3c4d.tmp"]
    for path in leftovers:
        path.write_bytes(b"\x89PNG")
    predict(root, run, "+predict_dir=tmp", "num_pairs=3")
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
    (folder / SETTINGS).write_text('{"seed": 0, "sam')  # cut short by an older version
    with pytest.raises(ValueError, match=rf"{SETTINGS} is unreadable.*overwrite=true"):
        predict(root, run, "+predict_dir=tmp")
    predict(root, run, "+predict_dir=tmp", "overwrite=true")
    assert sorted(read_manifest(folder)) == [0, 1]


def test_files_are_readable_by_the_group(trained):
    root, run = trained
    old = os.umask(0o022)
    try:
        folder = predict(root, run, "+predict_dir=modes")
    finally:
        os.umask(old)
    for path in [*folder.glob("*_*.png"), folder / SETTINGS]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
