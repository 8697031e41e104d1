"""A run is identified by everything that changes its result: a changed setting never silently
continues (and overwrites) another run; the check happens before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_in
from stedm.resume import IDENTITY_KEY, check_run_start, read_checkpoint
from stedm.tasks.segmentation import train_segmentation

ROOT = Path(__file__).resolve().parents[1]
RUN = ["preset=tiny", "data.patch_size=32", "data.samples=16", "trainer.max_steps=4", "trainer.max_epochs=-1",
       "trainer.enable_progress_bar=false", "test_checkpoints=[]", "location.precision=32-true"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny train_seg run (its checkpoints are only read by the tests below)."""
    root = tmp_path_factory.mktemp("identity")
    train_segmentation(compose_in(root, "train_seg", RUN))
    return root


@pytest.mark.parametrize("change, key", [
    ("data.patch_size=48", "data.patch_size"),
    ("data.augment.flips=false", "data.augment.flips"),
    ("data.samples=32", "data.samples"),
    ("data.batch_base=2", "derived.batch_size"),
    ("lr=0.5", "derived.lr"),
    ("segmenter.loss.ce_weight=0.5", "model.loss.ce_weight"),
    ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
])
def test_a_changed_setting_is_refused_naming_the_key(finished_run, change, key):
    cfg = compose_in(finished_run, "train_seg", [*RUN, change])
    with pytest.raises(ValueError, match=rf"other settings(.|\n)*{key.replace('.', '[.]')}: .* -> (.|\n)*run_name="):
        check_run_start(cfg)


@pytest.mark.parametrize("change", ["trainer.max_steps=8", "location.num_workers=1", "logger=[]",
                                    "checkpoint.every_n_train_steps=2", "allow_change=[data.samples] data.samples=32"])
def test_allowed_changes_continue_the_run(finished_run, change):
    cfg = compose_in(finished_run, "train_seg", [*RUN, *change.split()])
    start = check_run_start(cfg)
    assert start.checkpoint is not None and start.checkpoint.name == "last.ckpt"


def test_moved_data_and_result_folders_are_the_same_run(finished_run, tmp_path):
    """Paths under data_dir/result_dir are compared relative to them: a moved project resumes."""
    from stedm.resume import identity

    moved = tmp_path / "moved"
    (moved / "results").mkdir(parents=True)
    os.symlink(finished_run / "results" / "checkpoints", moved / "results" / "checkpoints")
    assert check_run_start(compose_in(moved, "train_seg", RUN)).checkpoint is not None
    here, there = (identity(compose_in(root, "train_seg", [*RUN, "data=folder"])) for root in (tmp_path, moved))
    assert here == there and "<data_dir>/folder" in str(here.values())


def test_input_weights_are_identified_by_content_not_path(tmp_path):
    """finetune_ssl.py pretrained=OTHER.pt must not continue the run fine-tuned from the first file."""
    from stedm.resume import identity

    weights = tmp_path / "pretrained_unet.pt"
    weights.write_bytes(b"first weights")
    cfg = compose_in(tmp_path, "finetune_ssl", ["preset=tiny", f"pretrained={weights}"])
    first = identity(cfg)["model.net.pretrained_path"]
    weights.write_bytes(b"other weights")  # same path, other content
    os.utime(weights, (1, 1))
    assert first.startswith("sha256:") and identity(cfg)["model.net.pretrained_path"] != first


def test_refused_runs_touch_no_file_of_the_earlier_run(finished_run, tmp_path):
    """The check runs before Hydra writes .hydra/ and its log: a refused command leaves the earlier
    run's folder byte for byte as it was, and exits non-zero with the differing key."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(finished_run, root)
    files = sorted(p for p in (root / "results").rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    command = [sys.executable, "train_seg.py", *RUN, f"location.data_dir={root / 'data'}",
               f"location.result_dir={root / 'results'}"]
    for extra, message in ((["data.patch_size=48"], "data.patch_size: 32 -> 48"),
                           (["resume=false"], "resume=false, but")):
        done = subprocess.run(command + extra, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    after = sorted(p for p in (root / "results").rglob("*") if p.is_file())
    assert after == files
    assert all((p.read_bytes(), p.stat().st_mtime_ns) == before[p] for p in files)


def test_checkpoints_load_without_executing_code(finished_run):
    """Our checkpoints hold plain values and tensors only (weights_only loading accepts them)."""
    cfg = compose_in(finished_run, "train_seg", RUN)
    for path in (Path(cfg.location.result_dir) / "checkpoints" / cfg.run_name).glob("*.ckpt"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == 4 and IDENTITY_KEY in checkpoint


def test_a_sweep_job_that_would_continue_another_run_is_refused_before_launch(finished_run):
    from stedm.hydra_callbacks import check_jobs
    from test_cluster import planned_jobs

    paths = [f"location.data_dir={finished_run / 'data'}", f"location.result_dir={finished_run / 'results'}"]
    master, planned = planned_jobs("train_seg", [*RUN, *paths, "data.patch_size=48", "seed=1,0"])
    with pytest.raises(ValueError, match=r"(?s)multirun job 1 \(.*seed=0\): resume: .*data.patch_size: 32 -> 48"):
        check_jobs(master.hydra.launcher, planned)
