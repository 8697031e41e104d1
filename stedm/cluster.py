"""What a process learns from whoever launched it: its rank, and how DDP processes and requeues
are organised on clusters.

Process layouts the project supports:

- one command on one machine: Lightning (or Fabric, for ``predict_diff.py``) starts the other
  ranks itself, re-running the script with ``LOCAL_RANK`` set;
- SLURM through submitit (``hydra/launcher=slurm``): ``srun`` starts one task per GPU and
  Lightning reads its rank from SLURM's variables;
- ``hydra/launcher=submitit_local`` with ``tasks_per_node > 1``: submitit starts the tasks and
  :func:`adopt_submitit_local_tasks` turns its variables into torch.distributed's.

Requeueing belongs to submitit alone (its ``USR2`` handler requeues a job that times out or is
preempted, ``max_num_timeout`` times for timeouts); Lightning's own SLURM auto-requeue is
switched off (:func:`cluster_plugins`). A requeued job runs the same Hydra job again, which
continues from its ``last.ckpt`` (``resume=auto``).
"""

from __future__ import annotations

import os


def is_rank_zero_process() -> bool:
    """Whether this process is global rank zero, from what its launcher put in the environment
    (so it is known before any Trainer or process group exists)."""
    env = os.environ
    if "RANK" in env:  # torchrun, or adopt_submitit_local_tasks
        return int(env["RANK"]) == 0
    if "LOCAL_RANK" in env or "NODE_RANK" in env:  # Lightning's and Fabric's script launcher
        return int(env.get("LOCAL_RANK", 0)) == 0 and int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))) == 0
    for key in ("SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):  # srun; submitit's local tasks
        if key in env:
            return int(env[key]) == 0
    return True


def adopt_submitit_local_tasks() -> None:
    """In a ``submitit_local`` job of several tasks, export ``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (the port derived from the job id), so
    that Lightning treats the tasks as externally launched DDP ranks instead of starting its own."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def cluster_plugins() -> list:
    """Trainer plugins for the cluster this runs on: under SLURM, Lightning's environment with
    its auto-requeue off, so that submitit's is the only requeue mechanism."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


# -- DataLoader workers --------------------------------------------------------------------------
SCHEDULER_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")
"""What SLURM sends every process of a job at a time limit, preemption or requeue."""


def ignore_scheduler_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader: its workers ignore the scheduler's signals, which
    SLURM sends to every process of a job. They would otherwise run the handlers inherited from the
    main process (submitit's USR2 requeue, Lightning's SIGTERM), race on submitit's requeue pickle
    and die, failing the job (submitit #1617, Lightning #20280); only the main process checkpoints
    and requeues, and it stops its workers itself."""
    import signal

    for name in SCHEDULER_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


# -- what a SLURM partition can hold -------------------------------------------------------------
def partition_nodes(partition: str | None) -> list[dict] | None:
    """The nodes of ``partition`` (None: the default one) as ``sinfo`` reports them: name, CPUs,
    memory (MB), GPUs. None where SLURM cannot be asked (no ``sinfo``, or it fails)."""
    import re
    import shutil
    import subprocess

    if shutil.which("sinfo") is None:
        return None
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    nodes, default = {}, None
    for line in done.stdout.splitlines():
        name, part, cpus, memory, gres = (line.strip().split("|") + [""] * 5)[:5]
        if part.endswith("*"):
            part = default = part[:-1]
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        nodes.setdefault(part, []).append({"name": name, "cpus": int(cpus), "memory_mb": int(memory.rstrip("+")),
                                           "gpus": gpus})
    wanted = partition or default
    if wanted not in nodes:
        return []
    return nodes[wanted]


def check_partition(launcher) -> None:
    """Refuse, before anything is submitted, a SLURM request the partition can never satisfy (it
    would stay PENDING for ever): more nodes, or per node more CPUs, memory or GPUs than its largest
    node has. Asks ``sinfo``; does nothing where SLURM cannot be reached."""
    partition = launcher.get("partition")
    nodes = partition_nodes(partition)
    if nodes is None:
        return
    where = f"partition {partition}" if partition else "the default partition"
    if not nodes:
        raise ValueError(f"hydra/launcher=slurm: sinfo knows no {where}; set location.slurm.partition to one of "
                         f"`sinfo -s`")
    fix = "lower it (location.slurm.* or the location's devices) or choose a partition with larger nodes " \
          "(location.slurm.partition)"
    tasks = int(launcher.get("tasks_per_node") or 1)
    largest = {key: max(node[key] for node in nodes) for key in ("cpus", "memory_mb", "gpus")}
    if int(launcher.get("nodes") or 1) > len(nodes):
        raise ValueError(f"hydra.launcher.nodes={launcher.nodes} (location.num_nodes) but {where} has "
                         f"{len(nodes)} node(s); {fix}")
    cpus = tasks * int(launcher.get("cpus_per_task") or 1)
    if cpus > largest["cpus"]:
        raise ValueError(f"a job asks for {cpus} CPUs per node (hydra.launcher.cpus_per_task="
                         f"{launcher.get('cpus_per_task')} = location.slurm.cpus_per_task, x {tasks} tasks) but the "
                         f"largest node of {where} has {largest['cpus']}; {fix}")
    if launcher.get("mem_gb") is not None and int(launcher.mem_gb) * 1024 > largest["memory_mb"]:
        raise ValueError(f"a job asks for {launcher.mem_gb} GB per node (location.slurm.mem_gb) but the largest "
                         f"node of {where} has {largest['memory_mb'] // 1024} GB; {fix}")
    gpus = int(launcher.get("gpus_per_node") or 0)
    if gpus > largest["gpus"]:
        raise ValueError(f"a job asks for {gpus} GPUs per node (hydra.launcher.gpus_per_node = "
                         f"location.slurm.gpus_per_node) but {where} has at most {largest['gpus']}; for CPU jobs use "
                         f"location=cluster_cpu, else {fix}")


# -- submission errors ---------------------------------------------------------------------------
def report_submission_errors(sweep_dir) -> None:
    """In the launching process of a ``hydra/launcher=slurm`` sweep: when submitit cannot submit a
    batch of jobs (an ``sbatch`` refusal, e.g. an invalid GPU request), each of them is FAILED in the
    sweep summary with sbatch's message before the error ends the sweep. (Hydra takes launchers only
    from its ``hydra_plugins`` package, so this wraps submitit's submission instead of subclassing
    the launcher.)"""
    import submitit

    from stedm.hydra_callbacks import record_submission_error

    submit = getattr(submitit.AutoExecutor.map_array, "__wrapped__", submitit.AutoExecutor.map_array)

    def map_array(executor, *args, **kwargs):
        try:
            return submit(executor, *args, **kwargs)
        except Exception as error:
            # hydra_submitit_launcher maps (launcher, overrides, "hydra.sweep.dir", job numbers, ...)
            jobs = [int(job) for job in args[3]] if len(args) > 3 else None
            record_submission_error(sweep_dir, jobs, error)
            raise

    map_array.__wrapped__ = submit
    submitit.AutoExecutor.map_array = map_array
