"""Kill-and-resume: a run killed (SIGKILL) or stopped (SIGTERM) after a mid-epoch or an epoch-end
last.ckpt and started again with the same command ends with the same step, weights, EMA and
optimizer state as a run never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_in, forced_precision
from stedm.data.datamodule import StedmDataModule
from stedm.data.mixing import MixedEpochSampler
from stedm.tasks.diffusion import train_diffusion
from stedm.tasks.segmentation import train_segmentation

ROOT = Path(__file__).resolve().parents[1]
# location.precision pinned: the same numbers whatever the CPU (STEDM_TEST_PRECISION replaces it)
COMMON = ["preset=tiny", "data.patch_size=32", "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=2",
          "location.precision=32-true"]
# demo: batch 4, so 8 batches per epoch; 12 steps cross into the second epoch
DIFFUSION = [*COMMON, "data.samples=32", "trainer.max_steps=12", "diffusion.sample_every_n_steps=0"]
# 16 batches per epoch, two epochs with validation, then tests with the last and the best checkpoint
SEGMENTATION = [*COMMON, "data.samples=64", "trainer.max_epochs=2"]


def test_a_batch_is_the_same_whatever_the_workers(compose_cfg):
    cfg = compose_cfg("train_diff", ["preset=tiny", "data.patch_size=32", "data.samples=16"])
    batches = []
    for workers in (0, 2):
        datamodule = StedmDataModule(cfg.data, batch_size=4, num_workers=workers, eval_splits=(),
                                     style_source=instantiate(cfg.style_sampling.source))
        batches.append(list(datamodule.train_dataloader())[:2])
    for plain, loaded_by_workers in zip(*batches, strict=True):
        for key in ("image", "mask", "style"):
            assert torch.equal(plain[key], loaded_by_workers[key]), key


def test_sampler_state_after_a_finished_epoch_starts_the_next():
    sampler = MixedEpochSampler([5, 7], [1.0, 1.0], samples=10, seed=3, item_seeds=True)
    sampler.set_epoch(4)
    share = list(sampler)
    assert len(share) == len(sampler) == 20 and len({seed for _, seed in share}) == 20
    for state in (sampler.state_dict(consumed=20), sampler.state_dict(consumed=8, epoch_finished=True)):
        restored = MixedEpochSampler([5, 7], [1.0, 1.0], samples=10, seed=3, item_seeds=True)
        restored.load_state_dict(state)
        assert (restored.epoch, restored.start) == (5, 0) and len(list(restored)) == 20
    mid = MixedEpochSampler([5, 7], [1.0, 1.0], samples=10, seed=3, item_seeds=True)
    mid.load_state_dict(sampler.state_dict(consumed=8))
    assert len(mid) == 20 and list(mid) == share[8:]  # len() stays the epoch's: Lightning counts from it


def run_script(script: str, root: Path, overrides: list[str], stop: int | None = None) -> subprocess.CompletedProcess:
    """Run an entry script; with ``stop`` (a signal), send it once the run's first ``last.ckpt`` exists."""
    command = [sys.executable, script, *overrides, f"location.data_dir={root / 'data'}",
               f"location.result_dir={root / 'results'}", *forced_precision()]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    if stop is not None:
        checkpoints = root / "results" / "checkpoints"
        deadline = time.time() + 300
        while process.poll() is None and time.time() < deadline and not list(checkpoints.glob("*/last.ckpt")):
            time.sleep(0.02)
        process.send_signal(stop)
    _, stderr = process.communicate(timeout=300)
    if stop is None:
        assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, "", stderr)


def last_checkpoint(cfg) -> dict:
    path = Path(cfg.location.result_dir) / "checkpoints" / cfg.run_name / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)


def interrupt_and_resume(tmp_path: Path, script: str, overrides: list[str], train, steps_per_epoch: int,
                         total_steps: int, boundary: str = "mid", stop: int = signal.SIGKILL):
    """(config of the interrupted run, config of the reference run): the reference trains
    uninterrupted; the other is stopped by ``stop`` after its first checkpoint, which must lie
    ``mid``-epoch or at an epoch ``end``, then the same command runs again (resume=auto) to the end."""
    reference_cfg = compose_in(tmp_path / "reference", script, overrides)
    train(reference_cfg)
    interrupted = tmp_path / "interrupted"
    stopped = run_script(f"{script}.py", interrupted, overrides, stop=stop)
    if stop == signal.SIGTERM:  # a preempted or timed-out job must not look finished
        assert stopped.returncode == 143, stopped.stderr[-3000:]
    cfg = compose_in(interrupted, script, overrides)
    step = last_checkpoint(cfg)["global_step"]
    assert 0 < step < total_steps and (step % steps_per_epoch == 0) == (boundary == "end"), \
        f"the run should have been stopped after a checkpoint {boundary}-epoch (step {step})"
    run_script(f"{script}.py", interrupted, overrides)
    return cfg, reference_cfg


def assert_same_training_state(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"]
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    for own, ref in zip(resumed["optimizer_states"][0]["state"].values(),
                        reference["optimizer_states"][0]["state"].values(), strict=True):
        assert all(torch.equal(own[k], ref[k]) for k in ref)


@pytest.mark.e2e
def test_train_diff_resumes_exactly_with_its_ema(tmp_path):
    cfg, reference_cfg = interrupt_and_resume(tmp_path, "train_diff", DIFFUSION, train_diffusion,
                                              steps_per_epoch=8, total_steps=12)
    resumed, reference = last_checkpoint(cfg), last_checkpoint(reference_cfg)
    assert_same_training_state(resumed, reference)
    assert resumed["ema"]["optimization_step"] == reference["ema"]["optimization_step"] == 12
    for own, ref in zip(resumed["ema"]["shadow_params"], reference["ema"]["shadow_params"], strict=True):
        assert torch.equal(own, ref)


@pytest.mark.e2e
def test_train_diff_resumes_exactly_from_an_epoch_end_with_max_steps_and_accumulation(tmp_path):
    """Lightning's fit loop, with max_steps set, restarts a finished epoch from an epoch-end
    checkpoint (one extra batch); our checkpoints record the epoch boundary instead."""
    overrides = [*COMMON, "data.samples=32", "trainer.max_steps=6", "trainer.accumulate_grad_batches=2",
                 "checkpoint.every_n_train_steps=null", "diffusion.sample_every_n_steps=0"]
    cfg, reference_cfg = interrupt_and_resume(tmp_path, "train_diff", overrides, train_diffusion,
                                              steps_per_epoch=4, total_steps=6, boundary="end")
    resumed, reference = last_checkpoint(cfg), last_checkpoint(reference_cfg)
    assert_same_training_state(resumed, reference)
    assert resumed["epoch"] == reference["epoch"]
    for own, ref in zip(resumed["ema"]["shadow_params"], reference["ema"]["shadow_params"], strict=True):
        assert torch.equal(own, ref)


def assert_same_test_metrics(cfg, reference_cfg) -> None:
    for tag in ("last", "best"):
        runs = [Path(c.location.result_dir) / "runs" / "train_seg" / c.run_name for c in (cfg, reference_cfg)]
        assert json.loads((runs[0] / f"metrics_{tag}.json").read_text()) == \
            json.loads((runs[1] / f"metrics_{tag}.json").read_text())


@pytest.mark.e2e
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "sigterm"])
def test_train_seg_resumes_exactly_and_tests_the_same(tmp_path, stop):
    """SIGTERM (SLURM's preemption and time-out signal) also saves the step it finished and exits 143."""
    cfg, reference_cfg = interrupt_and_resume(tmp_path, "train_seg", SEGMENTATION, train_segmentation,
                                              steps_per_epoch=16, total_steps=32, stop=stop)
    assert_same_training_state(last_checkpoint(cfg), last_checkpoint(reference_cfg))
    assert_same_test_metrics(cfg, reference_cfg)


@pytest.mark.e2e
def test_train_seg_under_ddp_killed_after_an_epoch_end_resumes_exactly(tmp_path):
    """2 DDP processes (gloo), killed after the epoch-end checkpoint, then the same command again."""
    from test_cluster import DDP

    overrides = [*COMMON, "location.precision=32-true", "data.samples=64", "trainer.max_epochs=2",
                 "trainer.max_steps=16", "checkpoint.every_n_train_steps=null", "test_checkpoints=[]", *DDP]
    reference = tmp_path / "reference"
    run_script("train_seg.py", reference, overrides)
    interrupted = tmp_path / "interrupted"
    run_script("train_seg.py", interrupted, overrides, stop=signal.SIGKILL)
    cfg = compose_in(interrupted, "train_seg", overrides)
    assert last_checkpoint(cfg)["global_step"] == 8  # 64 samples / 2 ranks / batch 4: the first epoch's end
    run_script("train_seg.py", interrupted, overrides)
    assert_same_training_state(last_checkpoint(cfg), last_checkpoint(compose_in(reference, "train_seg", overrides)))


@pytest.mark.e2e
def test_train_seg_resumes_exactly_from_an_epoch_end_and_keeps_its_log(tmp_path):
    """max_steps and max_epochs both set, killed after the first epoch's checkpoint: the same
    weights and test metrics, and metrics.csv holds the rows of both attempts."""
    import pandas as pd

    overrides = [*COMMON, "data.samples=64", "trainer.max_epochs=2", "trainer.max_steps=32",
                 "checkpoint.every_n_train_steps=null"]
    cfg, reference_cfg = interrupt_and_resume(tmp_path, "train_seg", overrides, train_segmentation,
                                              steps_per_epoch=16, total_steps=32, boundary="end")
    assert_same_training_state(last_checkpoint(cfg), last_checkpoint(reference_cfg))
    assert_same_test_metrics(cfg, reference_cfg)
    log = pd.read_csv(Path(cfg.location.result_dir) / "runs" / "train_seg" / cfg.run_name / "logs" / "metrics.csv")
    assert set(log["attempt"]) == {1, 2}
    first = log[log["attempt"] == 1]
    assert first["train/loss_step"].notna().any() and first["step"].max() >= 15


@pytest.mark.parametrize("stop_at", [2, 4], ids=["mid-epoch", "epoch-end"])
def test_raising_max_steps_continues_a_finished_run_exactly(tmp_path, stop_at):
    """``trainer.max_steps`` may be raised to train a finished run longer (stedm.resume allows the
    change): stopped mid-epoch or at an epoch end, it ends as a run that had the longer budget."""
    base = [*COMMON, "data.samples=16", "trainer.max_epochs=-1", "checkpoint.every_n_train_steps=null",
            "test_checkpoints=[]", "logger=[]"]  # 4 steps per epoch
    reference = compose_in(tmp_path / "reference", "train_seg", [*base, "trainer.max_steps=6"])
    train_segmentation(reference)
    train_segmentation(compose_in(tmp_path / "longer", "train_seg", [*base, f"trainer.max_steps={stop_at}"]))
    longer = compose_in(tmp_path / "longer", "train_seg", [*base, "trainer.max_steps=6"])
    train_segmentation(longer)
    assert_same_training_state(last_checkpoint(longer), last_checkpoint(reference))
