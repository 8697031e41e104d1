"""Sweeps on a real SLURM (marker ``slurm``): ``.ci/run`` starts a single-node cluster
(``.ci/slurm.sh``) where the machine allows it and sets ``STEDM_SLURM=1``; elsewhere these tests
skip, saying why. Two-job sweeps of train_seg and train_diff; a time-limit requeue with DataLoader
workers, a preemption (``scancel --signal=USR2``) and an ``scontrol requeue``, each ending with the
weights of an uninterrupted run; a job failing inside and a submission sbatch refuses, FAILED in the
summary with their errors. The checks made before submitting (what the partition can hold, GPUs
and NCCL on CPU locations) are tested without a cluster too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stedm.cluster import check_partition
from stedm.hydra_callbacks import check_jobs
from test_cluster import PINNED, ROOT, TINY, planned_jobs

CLUSTER = os.environ.get("STEDM_SLURM") == "1"
needs_cluster = pytest.mark.skipif(
    not CLUSTER, reason=os.environ.get("STEDM_SLURM_UNAVAILABLE")
    or "no SLURM cluster: .ci/run starts one (.ci/slurm.sh start, root and apt-get) and sets STEDM_SLURM=1")
# CPU jobs of one CPU each on the local node (2 CPUs), a few seconds of training each
JOB = ["location=cluster_cpu", "location.slurm.cpus_per_task=1", "location.slurm.mem_gb=2", *TINY, *PINNED,
       "data.samples=16"]


LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_leftovers():
    """A test that fails leaves neither its launchers nor its jobs behind for the next one."""
    yield
    for process in LAUNCHED:
        if process.poll() is None:
            process.kill()
            process.wait()
    if LAUNCHED:
        subprocess.run(["scancel", "--name=train_seg,train_diff"], capture_output=True)
    LAUNCHED.clear()


def sweep(script: str, root: Path, *overrides: str) -> subprocess.Popen:
    """``python <script> -m hydra/launcher=slurm ...`` started as a user starts it."""
    command = [sys.executable, script, "-m", "hydra/launcher=slurm", *JOB, *overrides,
               f"location.data_dir={root / 'data'}", f"location.result_dir={root / 'results'}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    LAUNCHED.append(process)
    return process


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def sweep_dir(root: Path, script: str) -> Path:
    [found] = (root / "results" / "multirun" / script).iterdir()
    return found


def summary_of(root: Path, script: str) -> pd.DataFrame:
    return pd.read_csv(sweep_dir(root, script) / "sweep_summary.csv").set_index("job")


def sacct(job_id: str) -> tuple[str, str]:
    """(state, exit code) of the job's allocation as accounting reports it."""
    for _ in range(20):  # accounting follows the controller by a moment
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"], capture_output=True,
                             text=True, check=True).stdout.split()
        if out and out[-1].split("|")[0] not in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING"):
            return tuple(out[-1].split("|"))
        time.sleep(1)
    return tuple(out[-1].split("|")) if out else ("", "")


def weights(root: Path, run_name: str) -> dict:
    checkpoint = torch.load(root / "results" / "checkpoints" / run_name / "last.ckpt", map_location="cpu",
                            weights_only=True)
    return checkpoint["state_dict"]


def job_record(root: Path, script: str, timeout: float = 120) -> dict:
    """The running job's sweep_job.json (its SLURM id) once it exists."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list((root / "results" / "multirun" / script).glob("*/*/sweep_job.json"))
        if found:
            return json.loads(found[0].read_text())
        time.sleep(0.5)
    raise AssertionError(f"no job of {root} started within {timeout}s")


def queued(count: int, timeout: float = 120) -> None:
    """Wait until SLURM holds ``count`` jobs (running or pending)."""
    deadline = time.time() + timeout
    while len(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()) < count:
        assert time.time() < deadline, f"fewer than {count} jobs submitted within {timeout}s"
        time.sleep(0.25)


@pytest.fixture
def release_requeued():
    """SLURM holds a requeued job about 2.5 minutes before it may start again (BeginTime): let it
    start at once, while the test runs. ``restore[job] = "TimeLimit=10"`` gives a held job that
    setting back before it starts again."""
    stop = threading.Event()
    released: list[str] = []
    restore: dict[str, str] = {}

    def loop():
        while not stop.wait(0.5):
            listing = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True)
            for line in listing.stdout.splitlines():
                job, _, reason = line.partition(" ")
                if reason.strip() == "BeginTime":
                    settings = [restore[job]] if job in restore else []
                    subprocess.run(["scontrol", "update", f"JobId={job}", *settings, "StartTime=now"],
                                   capture_output=True)
                    released.append(job)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield released, restore
    stop.set()
    thread.join()


def submitit_log(root: Path, job: str) -> str:
    """What submitit logged in the job, over all its attempts."""
    return "".join(path.read_text() for path in (sweep_dir(root, "train_seg") / ".submitit").glob(f"{job}/*_log.err"))


# -- checks before submission, everywhere ----------------------------------------------------------
def fake_sinfo(tmp_path: Path, monkeypatch, *lines: str) -> None:
    """An ``sinfo`` that reports ``lines`` (``node|partition|cpus|memory MB|gres``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(lines) + "\nEOF\n")
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("overrides,message", [
    (["location=cluster"], "asks for 40 CPUs per node"),  # 4 tasks x cpus_per_task 10 on a 4-CPU node
    (["location=cluster", "location.slurm.cpus_per_task=1", "location.slurm.mem_gb=256"], "asks for 256 GB"),
    (["location=cluster", "location.slurm.cpus_per_task=1", "location.slurm.mem_gb=2"], "asks for 4 GPUs"),
    (["location=cluster_cpu", "location.slurm.cpus_per_task=1", "location.num_nodes=2"], "has 1 node"),
    (["location=cluster_cpu", "location.slurm.partition=gpu"], "knows no partition gpu"),
])
def test_requests_the_partition_can_never_hold_are_refused_before_submission(tmp_path, monkeypatch, overrides,
                                                                            message):
    fake_sinfo(tmp_path, monkeypatch, "n1|main*|4|7000|(null)", "n2|cpu|4|7000|(null)")
    master, _ = planned_jobs("train_seg", ["hydra/launcher=slurm", *overrides])
    with pytest.raises(ValueError, match=message):
        check_partition(master.hydra.launcher)


def test_a_request_the_partition_holds_passes(tmp_path, monkeypatch):
    fake_sinfo(tmp_path, monkeypatch, "n1|main*|4|16000|(null)", "g1|gpu|40|300000|gpu:a100:4(S:0-1)")
    check_partition(planned_jobs("train_seg", ["hydra/launcher=slurm", "location=cluster_cpu"])[0].hydra.launcher)
    check_partition(planned_jobs("train_seg", ["hydra/launcher=slurm", "location=cluster",
                                               "location.slurm.partition=gpu"])[0].hydra.launcher)


@pytest.mark.parametrize("overrides,message", [
    (["location=cluster", "location.accelerator=cpu"], "asks the scheduler for GPUs; use location=cluster_cpu"),
    (["location=cluster_cpu", "location.backend=nccl"], "location.backend=nccl needs GPUs"),
])
def test_gpu_requests_and_nccl_on_cpu_locations_are_refused(overrides, message):
    master, planned = planned_jobs("train_seg", ["hydra/launcher=slurm", *overrides])
    with pytest.raises(ValueError, match=message):
        check_jobs(master.hydra.launcher, planned)


def test_cpu_cluster_location_asks_for_no_gpus():
    master, planned = planned_jobs("train_seg", ["hydra/launcher=slurm", "location=cluster_cpu", "seed=0,1"])
    check_jobs(master.hydra.launcher, planned)
    launcher = master.hydra.launcher
    assert launcher.gpus_per_node is None and launcher.tasks_per_node == 1
    assert (launcher.cpus_per_task, launcher.mem_gb) == (3, 8)  # the loader workers + the training process
    assert planned[0][1].location.backend is None  # gloo on CPUs


# -- a real cluster ----------------------------------------------------------------------------------
@pytest.mark.slurm
@needs_cluster
def test_train_seg_and_train_diff_sweeps_complete_on_slurm(tmp_path):
    seg = sweep("train_seg.py", tmp_path / "seg", "trainer.max_epochs=1", "seed=0,1")
    diff = sweep("train_diff.py", tmp_path / "diff", "trainer.max_steps=2", "diffusion.sample_every_n_steps=0",
                 "style_agg=mean,max")
    for process in (seg, diff):
        code, output = finish(process)
        assert code == 0, output[-4000:]
    for root, script, swept in ((tmp_path / "seg", "train_seg", "seed"), (tmp_path / "diff", "train_diff", "style_agg")):
        summary = summary_of(root, script)
        assert list(summary["status"]) == ["COMPLETED"] * 2 and (summary["attempts"] == 1).all()
        assert summary["swept"].str.startswith(f"{swept}=").all() and summary["run_name"].is_unique
        assert np.isfinite(summary["value"]).all()
        for job, row in summary.iterrows():
            assert sacct(str(row["slurm_job_id"])) == ("COMPLETED", "0:0")
            job_dir = Path(row["output_dir"])  # <result_dir>/multirun/<script>/<date_time>/<job>_<run name>
            assert job_dir.parent == sweep_dir(root, script) and job_dir.name == f"{job}_{row['run_name']}"
            assert (job_dir / "run_metrics.json").is_file() and (job_dir / "sweep_job.json").is_file()
            assert (root / "results" / "checkpoints" / row["run_name"] / "last.ckpt").is_file()
        assert list((sweep_dir(root, script) / ".submitit").glob("*_0/*_0_log.out"))  # submitit's logs


@pytest.mark.slurm
@needs_cluster
def test_requeued_jobs_end_with_the_weights_of_an_uninterrupted_run(tmp_path, release_requeued):
    """The same run four times side by side, each in its own result folder, with a DataLoader
    worker: through untouched; to a time limit; preempted (``scancel --signal=USR2``: submitit
    requeues); ``scontrol requeue`` (SIGTERM: saved, requeued by SLURM). Each continues from its
    last.ckpt and ends where the untouched one does.

    The time limit is SLURM's own: the job asks for 10 minutes with the warning (USR2) 120 s before
    the end; once it has written a checkpoint its limit is cut to 2 minutes, so SLURM's next
    time-limit check (every 30 s) finds it inside the warning window and signals it; submitit
    counts a signal in a job of at most 10 minutes as a time-out (one of ``max_requeues``) and
    requeues it. Its limit goes back to 10 minutes before it starts again. (Waiting out a real
    2-minute limit costs minutes, and SLURM may send the warning up to 60 s early, before
    submitit's handler is in place.)"""
    released, restore = release_requeued
    # 80 epochs: on an idle machine the run still lasts > 40 s after its first checkpoint, longer
    # than SLURM may take (30 s) to send the warning once the limit is cut
    run = ["location.num_workers=1", "trainer.max_epochs=80", "checkpoint.every_n_train_steps=4", "seed=0"]
    plain, limit, preempt, requeue = (tmp_path / name for name in ("plain", "limit", "preempt", "requeue"))
    # submitted in this order, SLURM starts them in this order on the node's two CPUs: the time
    # limit (which waits longest for its signal) first, the uninterrupted one last
    started = {limit: sweep("train_seg.py", limit, *run, "location.slurm.timeout_min=10",
                            "location.slurm.max_requeues=2")}
    queued(1)
    started.update({root: sweep("train_seg.py", root, *run, "location.slurm.timeout_min=15") for root in (preempt, requeue)})
    queued(3)
    started[plain] = sweep("train_seg.py", plain, *run)
    jobs: dict[Path, str] = {}

    def cut_time_limit(job: str) -> None:
        restore[job] = "TimeLimit=10"
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=2"], check=True)

    actions = {limit: cut_time_limit, preempt: lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True),
               requeue: lambda job: subprocess.run(["scontrol", "requeue", job], check=True)}
    deadline = time.time() + 240
    while len(jobs) < len(actions):  # each as soon as it has a checkpoint, in whichever order SLURM starts them
        for root, action in actions.items():
            if root not in jobs and list((root / "results" / "checkpoints").glob("*/last.ckpt")):
                jobs[root] = str(job_record(root, "train_seg")["slurm_job_id"])
                action(jobs[root])
        assert time.time() < deadline, f"no checkpoint within 240 s in {set(actions) - set(jobs)}"
        time.sleep(0.25)
    done = {root: finish(process) for root, process in started.items()}
    for root, (code, output) in done.items():
        assert code == 0, f"{root.name}: {output[-4000:]}"  # the launcher does not fail the sweep

    reference = summary_of(plain, "train_seg").loc[0]
    assert reference["status"] == "COMPLETED" and reference["attempts"] == 1
    expected = weights(plain, reference["run_name"])
    for root in (limit, preempt, requeue):
        row = summary_of(root, "train_seg").loc[0]
        assert row["status"] == "COMPLETED" and row["attempts"] >= 2, (root.name, row.to_dict())
        record = json.loads((Path(row["output_dir"]) / "sweep_job.json").read_text())
        assert record["earlier_seconds"] > 0  # minutes count every attempt
        assert row["minutes"] == round((record["earlier_seconds"] + record["ended"] - record["started"]) / 60, 2)
        assert sacct(str(row["slurm_job_id"])) == ("COMPLETED", "0:0")
        got = weights(root, row["run_name"])
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (root.name, key)
    # submitit took the time limit's warning for a time-out, the preemption for a preemption
    assert "this job is timed-out" in submitit_log(limit, jobs[limit])
    assert "this job is preempted" in submitit_log(preempt, jobs[preempt])
    assert {jobs[limit], jobs[preempt], jobs[requeue]} <= set(released)  # held after requeueing, let go


@pytest.mark.slurm
@needs_cluster
def test_failing_and_refused_jobs_are_failed_in_the_summary_with_their_error(tmp_path):
    failing = sweep("train_seg.py", tmp_path / "fails", "trainer.max_epochs=1", "data.class_train_samples=0,4")
    refused = sweep("train_seg.py", tmp_path / "refused", "+hydra.launcher.additional_parameters.gres=gpu:1", "seed=0,1")
    code, output = finish(failing)
    assert code != 0 and "class_train_samples=0" in output
    summary = summary_of(tmp_path / "fails", "train_seg")
    assert summary.loc[0, "status"] == "FAILED" and "class_train_samples=0" in summary.loc[0, "error"]
    # submitit catches the job's exception and the job exits 0: SLURM's accounting says COMPLETED
    assert sacct(str(summary.loc[0, "slurm_job_id"])) == ("COMPLETED", "0:0")

    code, output = finish(refused)
    assert code != 0
    summary = summary_of(tmp_path / "refused", "train_seg")
    assert list(summary["status"]) == ["FAILED", "FAILED"]
    assert summary["error"].str.contains("sbatch: error: Invalid generic resource").all(), summary["error"].tolist()
