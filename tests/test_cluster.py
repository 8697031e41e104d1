"""Clusters: the SLURM preset and what it submits, the checks made before a sweep starts, a real
multirun through submitit_local with its summary, and every entry script under DDP (2 CPU
processes, gloo) giving the results a single process gives."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import instantiate
from PIL import Image

from conftest import CONF_DIR, compose_in, forced_precision
from stedm.hydra_callbacks import check_jobs, plan_jobs
from stedm.run import build_datamodule, prepare
from stedm.data.pair_folder import merge_rank_manifests
from stedm.tasks.predict import predict_pairs

ROOT = Path(__file__).resolve().parents[1]
DDP = ["location.accelerator=cpu", "location.devices=2", "location.strategy=ddp"]
TINY = ["preset=tiny", "data.patch_size=32", "trainer.enable_progress_bar=false"]
# Runs whose numbers are compared: the same precision whatever the CPU (auto is bf16-mixed on CPUs
# with AVX512-BF16 / AMX, 32-true elsewhere); STEDM_TEST_PRECISION replaces it on both sides.
PINNED = ["location.precision=32-true"]


def run_script(script: str, root: Path, *overrides: str, env: dict | None = None,
               expect_success: bool = True) -> subprocess.CompletedProcess:
    """The script as a user starts it (Lightning re-runs it for the other DDP ranks)."""
    command = [sys.executable, script, *overrides, f"location.data_dir={root / 'data'}",
               f"location.result_dir={root / 'results'}", *forced_precision()]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if expect_success:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def planned_jobs(config_name: str, overrides: list[str]):
    """The sweep's master config and its jobs, as ``python <script> -m <overrides>`` plans them."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(config_name, overrides=overrides, run_mode=RunMode.MULTIRUN)
        return master, plan_jobs(master)


# -- SLURM ---------------------------------------------------------------------------------------
def fake_slurm(tmp_path: Path) -> dict:
    """``srun`` and an ``sbatch`` that refuses every job: submitit prepares the real submission,
    which stays in the sweep's .submitit folder, and nothing reaches a cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun", "sinfo"):  # sinfo failing: the partition check is skipped, as without SLURM
        (bin_dir / tool).write_text("#!/bin/sh\necho 'no cluster here' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.e2e
def test_slurm_sweep_submits_one_task_per_gpu_with_requeue(tmp_path):
    sweep = ["-m", "hydra/launcher=slurm", "location=cluster", "location.slurm.partition=gpu",
             "style_sampling=augmented,mp", "style_agg=mean,linear"]
    done = run_script("train_diff.py", tmp_path, *sweep, env=fake_slurm(tmp_path), expect_success=False)
    assert "no cluster here" in done.stderr
    sweep_dir = next((tmp_path / "results" / "multirun" / "train_diff").iterdir())
    [script] = (sweep_dir / ".submitit").glob(".submission_file_*.sh")
    flags = {line.split("=")[0]: line.split("=", 1)[-1] for line in script.read_text().splitlines()
             if line.startswith("#SBATCH")}
    assert flags["#SBATCH --array"] == "0-3%4"  # the four jobs of the sweep
    assert flags["#SBATCH --partition"] == "gpu" and flags["#SBATCH --nodes"] == "1"
    assert flags["#SBATCH --ntasks-per-node"] == flags["#SBATCH --gpus-per-node"] == "4"  # location=cluster
    assert flags["#SBATCH --cpus-per-task"] == "10" and flags["#SBATCH --mem"] == "256GB"
    assert flags["#SBATCH --time"] == "1440" and flags["#SBATCH --signal"] == "USR2@120"
    assert "#SBATCH --requeue" in flags
    submitted = [pickle.loads(p.read_bytes()) for p in (sweep_dir / ".submitit").glob("*.pkl")]
    assert len(submitted) == 4 and all(s._timeout_countdown == 5 for s in submitted)  # max_requeues
    summary = pd.read_csv(sweep_dir / "sweep_summary.csv")
    # sbatch refused the array: every job FAILED, with sbatch's message (not PENDING forever)
    assert list(summary["status"]) == ["FAILED"] * 4 and summary["error"].str.contains("no cluster here").all()
    assert summary["run_name"].str.contains("-mp-linear-").sum() == 1 and summary["run_name"].is_unique


@pytest.mark.e2e
def test_slurm_launcher_disagreeing_with_the_location_is_refused_before_submission(tmp_path):
    done = run_script("train_diff.py", tmp_path, "-m", "hydra/launcher=slurm", "location=cluster",
                      "hydra.launcher.tasks_per_node=2", env=fake_slurm(tmp_path), expect_success=False)
    assert "hydra.launcher.tasks_per_node=2 but location.devices=4" in done.stderr
    assert not list((tmp_path / "results").rglob(".submission_file_*"))


@pytest.mark.parametrize("overrides,message", [
    (["hydra/launcher=slurm", "location=local"], "needs location.devices as a number"),
    (["hydra/launcher=slurm", "location=cluster", "location.num_nodes=2,1"],  # a swept location key
     "hydra.launcher.nodes=1 but location.num_nodes=2"),
    (["hydra/launcher=submitit_local", "location.accelerator=cpu", "location.devices=2"],
     "hydra.launcher.tasks_per_node=1 but the processes of location.devices=2"),
    (["location.accelerator=cpu", "location.devices=2", "style_agg=mean,max"], "basic launcher"),
    (["lr=1e-4,1e-5"], "would share the run name"),
])
def test_sweeps_that_would_misbehave_are_refused(overrides, message):
    master, planned = planned_jobs("train_diff", overrides)
    with pytest.raises(ValueError, match=message):
        check_jobs(master.hydra.launcher, planned)


def test_agreeing_sweep_plans_every_combination():
    master, planned = planned_jobs("train_diff", ["hydra/launcher=slurm", "location=cluster",
                                                  "style_sampling=nearby,mp", "style_agg=mean,linear"])
    check_jobs(master.hydra.launcher, planned)
    names = [str(job.run_name) for _, job in planned]
    assert len(set(names)) == 4
    for (overrides, _), name in zip(planned, names):
        sampling, agg = (o.split("=")[1] for o in overrides if o.startswith(("style_sampling=", "style_agg=")))
        assert f"-{sampling}-{agg}-" in name


# -- a real sweep, on this machine -------------------------------------------------------------------
@pytest.mark.e2e
def test_submitit_local_sweep_runs_each_job_in_its_own_directory_and_summarises(tmp_path):
    done = run_script("train_diff.py", tmp_path, "-m", "hydra/launcher=submitit_local", *TINY, "data.samples=8",
                      "trainer.max_steps=2", "diffusion.sample_every_n_steps=0", "data.class_train_samples=4,3,0",
                      expect_success=False)
    assert done.returncode != 0 and "class_train_samples=0" in done.stderr  # job 2 fails, the sweep reports it
    sweep_dir = next((tmp_path / "results" / "multirun" / "train_diff").iterdir())
    summary = pd.read_csv(sweep_dir / "sweep_summary.csv").set_index("job")
    assert list(summary["status"]) == ["COMPLETED", "COMPLETED", "FAILED"]
    assert list(summary["swept"]) == [f"data.class_train_samples={k}" for k in (4, 3, 0)]
    assert "class_train_samples=0" in summary.loc[2, "error"]
    assert (summary.loc[[0, 1], "metric"] == "fit/train/loss").all() and np.isfinite(summary.loc[[0, 1], "value"]).all()
    assert summary["run_name"].is_unique and summary["output_dir"].is_unique
    for job in (0, 1):
        job_dir = Path(summary.loc[job, "output_dir"])
        assert job_dir.parent == sweep_dir and job_dir.name == f"{job}_{summary.loc[job, 'run_name']}"
        assert f"-k{4 - job}-" in job_dir.name  # the swept choice is in the run name
        assert json.loads((job_dir / "run_metrics.json").read_text())["fit/train/loss"] == summary.loc[job, "value"]
        checkpoint = torch.load(tmp_path / "results" / "checkpoints" / summary.loc[job, "run_name"] / "last.ckpt",
                                map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == 2


# -- DDP: every entry script with 2 processes ------------------------------------------------------
@pytest.mark.e2e
def test_train_diff_and_predict_diff_under_ddp(tmp_path):
    train = [*TINY, *PINNED, "data.samples=16", "trainer.max_steps=4", "diffusion.sample_every_n_steps=2",
             "sampling.steps=2", "checkpoint.every_n_train_steps=2"]
    run_script("train_diff.py", tmp_path, *train, *DDP)
    cfg = compose_in(tmp_path, "train_diff", train)
    checkpoint = torch.load(Path(cfg.location.result_dir) / "checkpoints" / cfg.run_name / "last.ckpt",
                            map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint["StedmDataModule"]["sampler"]["world_size"] == 2
    ranks = checkpoint["callbacks"]["RandomState"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # each rank its own noise
    run = Path(cfg.location.result_dir) / "runs" / "train_diff" / cfg.run_name
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]

    predict = [*TINY, *PINNED, "sampler=dpm_solver", "steps=3", "progress=false", f"+ckpt_name={cfg.run_name}",
               "num_pairs=7", "batch_size=2"]
    run_script("predict_diff.py", tmp_path, *predict, "+predict_dir=two", *DDP)
    single = predict_pairs(compose_in(tmp_path, "predict_diff", [*predict, "+predict_dir=one"]))
    shared = single.parent / "two"
    names = sorted(p.name for pattern in ("img_*.png", "seg_*.png") for p in single.glob(pattern))
    assert len(names) == 14 and names == sorted(p.name for pattern in ("img_*.png", "seg_*.png")
                                                for p in shared.glob(pattern))
    for name in names:
        a, b = (np.asarray(Image.open(folder / name)).astype(int) for folder in (single, shared))
        assert np.abs(a - b).max() <= 2  # the synthesis tolerance: 2/255
    records = [json.loads(line) for line in (shared / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(7))
    assert not list(shared.glob("manifest.rank*.jsonl"))  # merged by rank zero


def test_rank_manifests_of_a_killed_run_merge_into_the_one_manifest(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"index": 0}\n{"index": 2}\n')
    (tmp_path / "manifest.rank1.jsonl").write_text('{"index": 1}\n{"index": 3}\n{"ind')  # killed mid-line
    (tmp_path / "manifest.rank2.jsonl").write_text('{"index": 2}\n{"index": 4}\n')  # 2: already merged
    merge_rank_manifests(tmp_path)
    indices = [json.loads(line)["index"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert sorted(indices) == [0, 1, 2, 3, 4] and not list(tmp_path.glob("manifest.rank*"))


@pytest.mark.e2e
def test_train_seg_under_ddp_counts_every_test_unit_once(tmp_path):
    overrides = [*TINY, *PINNED, "data.samples=16", "trainer.max_epochs=2"]
    run_script("train_seg.py", tmp_path, *overrides, *DDP)
    cfg = compose_in(tmp_path, "train_seg", overrides)
    run = Path(cfg.location.result_dir) / "runs" / "train_seg" / cfg.run_name
    distributed = json.loads((run / "metrics_last.json").read_text())
    assert distributed["n_units"] == 4 and len(pd.read_csv(run / "per_case_last.csv")) == 4
    assert (run / "metrics_best.json").is_file()
    # the same checkpoint tested by one process, at the same precision, gives the same metrics
    ctx = prepare(cfg, trains=False)  # tests a checkpoint, continues none
    model = instantiate(cfg.model, lr=1.0, output_dir=str(tmp_path / "single"))
    model.test_tag = "last"
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=ctx.precision, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, datamodule=build_datamodule(cfg, ctx, with_style=False), weights_only=True,
                 ckpt_path=str(Path(cfg.location.result_dir) / "checkpoints" / cfg.run_name / "last.ckpt"))
    single = json.loads((tmp_path / "single" / "metrics_last.json").read_text())
    assert single.keys() == distributed.keys()
    for key, value in single.items():
        assert value == pytest.approx(distributed[key], rel=1e-5, abs=1e-6), key


@pytest.mark.e2e
def test_pretrain_and_finetune_ssl_under_ddp(tmp_path):
    pretrain = [*TINY, "data.samples=16", "trainer.max_epochs=1", "ssl_net.sample_every_n_epochs=1",
                "ssl_net.sampling.steps=2"]
    run_script("pretrain_ssl.py", tmp_path, *pretrain, *DDP)
    cfg = compose_in(tmp_path, "pretrain_ssl", pretrain)
    run = Path(cfg.location.result_dir) / "runs" / "pretrain_ssl" / cfg.run_name
    assert (run / "pretrained_unet.pt").is_file() and (run / "samples" / "epoch_000.png").is_file()
    finetune = [*TINY, "data.samples=16", "trainer.max_epochs=1", f"pretrained={run / 'pretrained_unet.pt'}"]
    run_script("finetune_ssl.py", tmp_path, *finetune, *DDP)
    cfg = compose_in(tmp_path, "finetune_ssl", finetune)
    metrics = json.loads((Path(cfg.location.result_dir) / "runs" / "finetune_ssl" / cfg.run_name /
                          "metrics_last.json").read_text())
    assert metrics["n_units"] == 4 and 0 <= metrics["dice_fg"] <= 1
