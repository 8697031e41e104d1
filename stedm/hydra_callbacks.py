"""Hydra callbacks for multiruns (``-m``), registered in ``conf/common.yaml``.

:class:`SweepCallback`

- before anything is launched, composes every job of the sweep and refuses it, with an error
  that says what to change, when two jobs would share a run name (and so checkpoints), or when
  a job's processes disagree with the launcher: a submitit launcher must start one task per DDP
  rank (``tasks_per_node`` = ``location.devices``, ``nodes`` = ``location.num_nodes``, and the
  GPUs to match), and Hydra's basic launcher cannot start DDP processes at all; a job asking
  for GPUs, or an NCCL backend, on a location without them; and, where ``sinfo`` answers, a SLURM
  request the partition can never satisfy (:func:`stedm.cluster.check_partition`);
- in every job, global rank zero writes ``sweep_job.json`` in the job's directory (overrides,
  run name, status, attempts, final metrics from ``run_metrics.json``);
- writes ``sweep_summary.csv`` at the sweep root: one row per planned job (number, status, the
  swept overrides and all of them, main metric, run name, directory, error), rewritten as jobs
  finish and when the sweep ends (also when it ends with an error). A job SLURM refused to take
  (an ``sbatch`` error) is FAILED with sbatch's message; ``minutes`` and ``attempts`` count every
  attempt of a requeued job.
  ``python -m stedm.hydra_callbacks SWEEP_DIR`` rewrites it later, e.g. once the jobs of a
  SLURM sweep whose launcher was stopped have finished.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from stedm.cluster import check_partition, is_rank_zero_process, report_submission_errors
from stedm.fileio import write_text_atomic
from stedm.resume import WITHOUT_CHECKPOINTS, check_run_start

PLAN = "sweep_plan.json"
SUMMARY = "sweep_summary.csv"
JOB_RECORD = "sweep_job.json"
MAIN_METRICS = ("last/test/iou_fg", "best/test/iou_fg", "fit/val/iou_fg", "fit/val/loss", "fit/train/loss_epoch",
                "fit/train/loss")
"""What the summary reports when ``main_metric`` is null: the first of these a job has."""


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    # -- launcher process -----------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        planned = plan_jobs(config)
        if planned is not None:
            try:
                check_jobs(config.hydra.launcher, planned)
                if _is_slurm(config.hydra.launcher):
                    check_partition(config.hydra.launcher)
            except ValueError as error:
                # Hydra turns a callback's exceptions into warnings; exiting stops the sweep.
                raise SystemExit(f"Error: {error}") from error
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = [{"job": num, "overrides": overrides, "run_name": str(job.run_name)}
                for num, (overrides, job) in enumerate(planned or [])]
        plan = {"main_metric": config.get("main_metric"), "swept": swept_keys([j["overrides"] for j in jobs]),
                "jobs": jobs}
        (self.sweep_dir / PLAN).write_text(json.dumps(plan, indent=1))
        if _is_slurm(config.hydra.launcher):
            report_submission_errors(self.sweep_dir)
        write_summary(self.sweep_dir)
        atexit.register(self._final_summary)  # also when a failed job ends the sweep with an error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._final_summary()
        atexit.unregister(self._final_summary)

    def _final_summary(self) -> None:
        if self.sweep_dir is not None:
            print(f"sweep summary: {write_summary(self.sweep_dir)}", file=sys.stderr)

    # -- job processes (every rank of every job) ------------------------------------------------
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _records(config):
            return
        path = _job_dir(config) / JOB_RECORD
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        attempt = earlier.get("attempts", 0) + 1
        _write_json(path, {
            "job": int(config.hydra.job.num), "overrides": list(config.hydra.overrides.task),
            "run_name": config.get("run_name"), "status": "RUNNING", "attempts": attempt,
            "earlier_seconds": _seconds(earlier), "started": time.time(), "host": socket.gethostname(),
            "slurm_job_id": _slurm_job_id(), "output_dir": str(_job_dir(config))})
        atexit.register(_stamp_exit, path, attempt)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from stedm.callbacks import RUN_METRICS

        if not _records(config):
            return
        path = _job_dir(config) / JOB_RECORD
        record = json.loads(path.read_text()) if path.is_file() else {}
        metrics_file = _job_dir(config) / RUN_METRICS
        record.update(status=job_return.status.name, ended=time.time(),
                      metrics=json.loads(metrics_file.read_text()) if metrics_file.is_file() else {})
        try:
            _ = job_return.return_value  # raises the job's exception if it failed
        except Exception as error:  # noqa: BLE001 - recorded, Hydra re-raises it in the sweep
            record["error"] = f"{type(error).__name__}: {error}"
        _write_json(path, record)
        write_summary(Path(str(config.hydra.sweep.dir)).absolute())
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # The job's work is done: a time-limit signal arriving now must neither requeue it nor,
            # once submitit's handler is gone at exit, kill it (SLURM would record it FAILED).
            import signal

            signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _seconds(record: dict) -> float:
    """The time of every attempt a job record counts (the current one once it ended)."""
    started, ended = record.get("started"), record.get("ended")
    last = ended - started if started and ended and ended >= started else 0.0
    return record.get("earlier_seconds", 0.0) + last


def _stamp_exit(path: Path, attempt: int) -> None:
    """At exit of a job process: an attempt that ended without ``on_job_end`` (submitit requeued it
    at a time limit or preemption and exited) is INTERRUPTED, its time counted."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("attempts") == attempt and record.get("status") == "RUNNING" and not record.get("ended"):
        _mark_interrupted(path, "exited at a scheduler signal (time limit or preemption); requeued, it continues "
                                "from its checkpoint")


def _mark_interrupted(path: Path, reason: str) -> None:
    """The job record at ``path`` INTERRUPTED with ``reason``, and the sweep's summary rewritten."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(status="INTERRUPTED", ended=time.time(), error=reason)
    _write_json(path, record)
    write_summary(path.parent.parent)


def record_submission_error(sweep_dir: Path, jobs, error: BaseException) -> None:
    """The launcher could not submit ``jobs`` (e.g. sbatch refused them): each is FAILED in the
    summary with the submitter's message."""
    path = Path(sweep_dir) / PLAN
    plan = json.loads(path.read_text()) if path.is_file() else {"jobs": []}
    message = " ".join(str(error).split()) or type(error).__name__
    if jobs is None:
        jobs = [job["job"] for job in plan["jobs"]]
    plan.setdefault("submission_errors", {}).update({str(job): f"not submitted: {message}" for job in jobs})
    _write_json(path, plan)
    write_summary(Path(sweep_dir))


def record_interrupted(reason: str) -> None:
    """Mark this sweep job INTERRUPTED (a signal stopped it; it continues from its checkpoint when
    started again): a job that exits on a signal never reaches ``on_job_end``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    config = HydraConfig.get()
    if config.mode != RunMode.MULTIRUN or not is_rank_zero_process():
        return
    _mark_interrupted(Path(str(config.runtime.output_dir)) / JOB_RECORD, reason)


# -- planning and checks ---------------------------------------------------------------------------
def plan_jobs(config: DictConfig) -> list[tuple[list[str], DictConfig]] | None:
    """Every job of the sweep as ``(overrides, composed config)``, in Hydra's job order; None for
    sweepers other than the basic one (they choose their jobs as they go)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return None
    loader = GlobalHydra.instance().config_loader()
    arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    return [(job, loader.load_sweep_config(config, job)) for job in jobs]


def check_jobs(launcher: DictConfig, planned: list[tuple[list[str], DictConfig]]) -> None:
    """Refuse a sweep whose jobs would share checkpoints or whose processes the launcher would not
    start as DDP ranks; the errors say what to change."""
    first_with: dict[str, tuple[int, list[str]]] = {}
    for num, (overrides, job) in enumerate(planned):
        name = str(job.run_name)
        if name in first_with:
            other, other_overrides = first_with[name]
            differing = sorted({o.split("=")[0] for o in set(overrides) ^ set(other_overrides)})
            key = differing[0]
            raise ValueError(
                f"multirun: jobs {other} ({' '.join(other_overrides)}) and {num} ({' '.join(overrides)}) would share "
                f"the run name '{name}', so one would resume from or overwrite the other's outputs: the run name "
                f"does not contain {', '.join(differing)}. Sweep keys the run name contains, or make it contain the "
                f"swept key, e.g. run_name='{name}-{key}${{{key}}}' (predict_diff.py: "
                f"'+predict_dir=NAME-{key}${{{key}}}', which names its output folder too)")
        first_with[name] = (num, overrides)
        where = f"multirun job {num} ({' '.join(overrides) or 'no overrides'})"
        check_processes(launcher, job, where)
        if job.get("task") not in WITHOUT_CHECKPOINTS:
            try:
                check_run_start(job, write_check=False)  # each job checks again, and its folders, when it starts
            except (OSError, RuntimeError, ValueError) as error:
                raise ValueError(f"{where}: {error}") from error


def check_processes(launcher: DictConfig, job: DictConfig, where: str) -> None:
    """Refuse a job whose DDP processes the launcher would not start as such."""
    from stedm.run import resolve_devices, uses_cuda

    location = job.location
    target = str(launcher.get("_target_", ""))
    devices, nodes = location.devices, int(location.num_nodes)
    gpus_asked = int(launcher.get("gpus_per_node") or 0) if _is_slurm(launcher) else 0
    if not uses_cuda(location) and gpus_asked:
        raise ValueError(f"{where}: location.accelerator={location.accelerator} runs on CPUs but "
                         f"hydra.launcher.gpus_per_node={gpus_asked} asks the scheduler for GPUs; use "
                         "location=cluster_cpu, or set location.slurm.gpus_per_node=null")
    if str(location.get("backend")) == "nccl" and not uses_cuda(location):
        raise ValueError(f"{where}: location.backend=nccl needs GPUs but location.accelerator={location.accelerator}; "
                         "set location.backend=null (nccl on GPUs, gloo on CPUs) or location.backend=gloo")
    if _is_slurm(launcher):
        if not isinstance(devices, int):
            raise ValueError(f"{where}: hydra/launcher=slurm starts one task per device and needs location.devices "
                             f"as a number, got {devices!r} (location={location.name}); use location=cluster or set "
                             "location.devices=N")
        _compare(where, "tasks_per_node", launcher.tasks_per_node, "location.devices", devices)
        _compare(where, "nodes", launcher.nodes, "location.num_nodes", nodes)
        if location.accelerator in ("gpu", "cuda") and launcher.get("gpus_per_node") is not None:
            _compare(where, "gpus_per_node", launcher.gpus_per_node, "location.devices", devices)
    elif target.endswith("submitit_launcher.LocalLauncher"):
        processes = resolve_devices(location)
        _compare(where, "tasks_per_node", launcher.tasks_per_node, "the processes of location.devices", processes)
        _compare(where, "nodes", launcher.nodes, "location.num_nodes", nodes)
        gpus = int(launcher.get("gpus_per_node") or 0)
        if uses_cuda(location) and gpus < processes:
            raise ValueError(f"{where}: submitit_local shows a job hydra.launcher.gpus_per_node GPUs ({gpus}) but it "
                             f"runs on {processes}; pass hydra.launcher.gpus_per_node={processes}")
    elif target.endswith("BasicLauncher") and (resolve_devices(location) > 1 or nodes > 1):
        raise ValueError(f"{where}: Hydra's basic launcher runs jobs inside this process and cannot start DDP "
                         f"processes (location.devices={devices}, num_nodes={nodes}); use "
                         "hydra/launcher=submitit_local with hydra.launcher.tasks_per_node=N (and gpus_per_node=N), "
                         "or one device per job")


def swept_keys(jobs: list[list[str]]) -> list[str]:
    """The override keys whose values differ between the jobs."""
    values: dict[str, set[str]] = {}
    for overrides in jobs:
        for override in overrides:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return sorted(key for key, seen in values.items() if len(seen) > 1)


def _is_slurm(launcher: DictConfig) -> bool:
    return str(launcher.get("_target_", "")).endswith(".SlurmLauncher")


def _compare(where: str, launcher_key: str, launcher_value: Any, job_key: str, job_value: Any) -> None:
    if launcher_value != job_value:
        raise ValueError(f"{where}: hydra.launcher.{launcher_key}={launcher_value} but {job_key}={job_value}; "
                         "they must agree (one task per DDP process): override the location, which the launcher "
                         "follows, or set both")


# -- records and the summary -----------------------------------------------------------------------
def _records(config: DictConfig) -> bool:
    return config.hydra.mode == RunMode.MULTIRUN and is_rank_zero_process()


def _job_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.runtime.output_dir))


def _slurm_job_id() -> str | None:
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID")


def _write_json(path: Path, content: dict) -> None:
    write_text_atomic(json.dumps(content, indent=1, default=str), path)


def main_metric(metrics: dict[str, float], name: str | None) -> tuple[str | None, float | None]:
    if name:
        return name, metrics.get(name)
    for candidate in MAIN_METRICS:
        if candidate in metrics:
            return candidate, metrics[candidate]
    return None, None


def write_summary(sweep_dir: Path) -> Path:
    """``sweep_summary.csv``: the planned jobs joined with the records their jobs wrote."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    plan = json.loads((sweep_dir / PLAN).read_text()) if (sweep_dir / PLAN).is_file() else {"jobs": []}
    failed_submissions = plan.get("submission_errors", {})
    records = {}
    for path in sweep_dir.glob(f"*/{JOB_RECORD}"):
        record = json.loads(path.read_text())
        records[record["job"]] = record
    rows = []
    for job in sorted({j["job"] for j in plan["jobs"]} | set(records)):
        planned = next((j for j in plan["jobs"] if j["job"] == job), {})
        record = records.get(job, {})
        metric, value = main_metric(record.get("metrics", {}), plan.get("main_metric"))
        if not record and str(job) in failed_submissions:
            record = {"status": "FAILED", "error": failed_submissions[str(job)]}
        overrides = record.get("overrides") or planned.get("overrides", [])
        rows.append({
            "job": job, "status": record.get("status", "PENDING"),
            "swept": " ".join(o for o in overrides if o.partition("=")[0] in plan.get("swept", [])),
            "overrides": " ".join(overrides),
            "metric": metric, "value": value, "run_name": record.get("run_name") or planned.get("run_name"),
            "attempts": record.get("attempts", 0),
            "minutes": round(_seconds(record) / 60, 2) if record.get("ended") else None,
            "output_dir": record.get("output_dir"), "slurm_job_id": record.get("slurm_job_id"),
            "error": record.get("error")})
    path = sweep_dir / SUMMARY
    columns = ["job", "status", "swept", "overrides", "metric", "value", "run_name", "attempts", "minutes",
               "output_dir", "slurm_job_id", "error"]
    write_text_atomic(pd.DataFrame(rows, columns=columns).to_csv(index=False), path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stedm.hydra_callbacks SWEEP_DIR  (rewrites SWEEP_DIR/sweep_summary.csv)")
    print(write_summary(Path(sys.argv[1])))
