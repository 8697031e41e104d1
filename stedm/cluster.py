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
