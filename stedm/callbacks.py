"""Lightning callbacks every script's Trainer gets (:func:`stedm.run.build_callbacks`).

- :class:`LastCheckpoint`: ``last.ckpt``, written often enough that an interrupted or requeued
  job loses little (every ``checkpoint.every_n_train_steps`` optimizer steps, at every epoch end
  and when training stops), atomically, so that a kill never leaves half a file.
- :class:`RandomState`: every rank's torch / CUDA / numpy / Python generator states travel in
  the checkpoint, so a resumed run draws the same noise, timesteps and dropout as an
  uninterrupted one; fresh runs give each rank its own stream.
- :class:`RunMetrics`: the final metrics of ``fit`` and of every ``test`` go to
  ``<run dir>/run_metrics.json`` (what the sweep summary reports).

Together with the model and optimizer states, the step counters that Lightning keeps and the
training sampler's position (:meth:`stedm.data.datamodule.StedmDataModule.state_dict`), a run
resumed from ``last.ckpt`` mid-epoch ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Checkpoint

from stedm.fileio import replace_keeping_previous
from stedm.resume import IDENTITY_KEY, LAST, PREVIOUS, readable

log = logging.getLogger(__name__)
RUN_METRICS = "run_metrics.json"


class LastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` current.

    Saved after every ``every_n_train_steps``-th optimizer step (``None``/0: only at epoch ends),
    at the end of every training epoch (after its validation) and when fit ends. Lightning calls
    checkpoint callbacks after the other callbacks of the same hook, but the LightningModule's own
    ``on_train_batch_end`` runs after them: a module must update state it wants checkpointed
    (e.g. an EMA) in ``optimizer_step`` or ``training_step``.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and int(every_n_train_steps) < 0:
            raise ValueError(f"checkpoint.every_n_train_steps must be >= 0 or null, got {every_n_train_steps}")
        self.path = Path(dirpath) / LAST
        self.every_n_train_steps = int(every_n_train_steps or 0)
        self._saved_step: int | None = None
        self._epoch_boundary = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            self._saved_step = trainer.global_step  # resumed: the checkpoint holds this step already

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # The epoch's last batch is saved at the epoch end, after its validation (whose results,
        # e.g. the best checkpoint so far, belong in the checkpoint).
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches
        if self.every_n_train_steps and step and step % self.every_n_train_steps == 0 and not last_batch:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._epoch_boundary:
            mark_epoch_finished(checkpoint["loops"]["fit_loop"])
        else:
            mark_epoch_unfinished(checkpoint["loops"]["fit_loop"])

    def save(self, trainer: pl.Trainer) -> None:
        """Write the checkpoint (all ranks take part) unless this step is saved already."""
        if self._saved_step == trainer.global_step or trainer.sanity_checking:
            return
        partial = self.path.with_name(self.path.name + ".partial")
        loop = trainer.fit_loop.epoch_loop
        self._epoch_boundary = loop.batch_progress.current.processed >= trainer.num_training_batches
        try:
            trainer.save_checkpoint(partial)  # collective; global rank zero writes
        finally:
            self._epoch_boundary = False
        if trainer.is_global_zero:
            _, why = readable(partial)
            if why is not None:
                raise RuntimeError(f"the checkpoint just written to {partial} cannot be read back ({why}); "
                                   f"{self.path} is kept as it was. Is the disk full?")
            replace_keeping_previous(partial, self.path, self.path.with_name(PREVIOUS))
        trainer.strategy.barrier("LastCheckpoint.save")
        self._saved_step = trainer.global_step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """SIGTERM (SLURM's preemption and time-out signal) between two training batches of a
        single process: save the work so far, so that the requeued job loses nothing. Under DDP
        the ranks may stop at different batches (each checks its own signal flag), and a
        collective save there could hang or mismatch: they keep the last regular checkpoint."""
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        batches = trainer.fit_loop.epoch_loop.batch_progress.current
        between_batches = batches.completed == batches.processed and not trainer.sanity_checking
        if (isinstance(exception, SIGTERMException) and trainer.training and between_batches
                and trainer.world_size == 1):
            self.save(trainer)


def mark_epoch_finished(fit_loop: dict[str, Any]) -> None:
    """Record a checkpoint taken after an epoch's last batch as the boundary to the next epoch.

    Lightning saves such a checkpoint with the epoch processed but not yet completed. Resumed
    with ``max_steps`` set, its fit loop restarts that finished epoch (one extra batch, a shifted
    epoch counter); with ``max_epochs`` only, it counts the epoch completed. Writing the state the
    loop has once the epoch is completed and the next not yet begun (the epoch counted completed,
    the per-epoch "current" counters of batches, optimizer steps and schedulers at zero; the
    totals kept) makes both resume alike, at the start of the next epoch, exactly where the
    training sampler's state (:meth:`stedm.data.datamodule.StedmDataModule.state_dict`) resumes.
    """
    epochs = fit_loop["epoch_progress"]
    for scope in ("total", "current"):
        epochs[scope]["completed"] = epochs[scope]["processed"]

    def zero_current(progress: dict[str, Any]) -> None:
        for key, value in progress.items():
            if key == "current":
                progress[key] = {name: 0 for name in value}
            elif isinstance(value, dict):
                zero_current(value)

    for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress",
                "epoch_loop.automatic_optimization.optim_progress", "epoch_loop.manual_optimization.optim_step_progress"):
        if key in fit_loop:
            zero_current(fit_loop[key])
    fit_loop["epoch_loop.batch_progress"]["is_last_batch"] = False
    validation = fit_loop.get("epoch_loop.val_loop.batch_progress")
    if validation is not None:  # counts the validation batches of one epoch (Lightning resets it too)
        validation["total"] = {name: 0 for name in validation["total"]}


def mark_epoch_unfinished(fit_loop: dict[str, Any]) -> None:
    """A checkpoint taken when ``max_steps`` stopped training in the middle of an epoch: Lightning
    has counted that epoch processed, so a run continued from it (``trainer.max_steps`` raised)
    would start the next epoch and skip the rest of this one. Record it as the mid-epoch state
    it is (what a checkpoint after the epoch's last finished batch records)."""
    epochs = fit_loop["epoch_progress"]
    if epochs["current"]["processed"] == epochs["current"]["started"] > epochs["current"]["completed"]:
        for scope in ("total", "current"):
            epochs[scope]["processed"] -= 1


class RandomState(pl.Callback):
    """Each rank's generator states in the checkpoint, restored when training resumes.

    A fresh run seeds rank ``r`` with ``seed * 1_000_003 + r`` when training starts (model
    initialisation before that used ``seed`` on every rank, so the ranks start identical):
    without it, all ranks would draw the same noise and timesteps for different images.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._loaded: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is assembled: gather them all for rank zero's file.
        own = capture_random_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, own)
            return {"ranks": ranks}
        return {"ranks": [own]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict.get("ranks") or [])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training starts (or resumes) here: everything that consumed random numbers while
        # restoring or building loaders is behind us.
        states, self._loaded = self._loaded, None
        if states is None:
            seed_all(self.seed * 1_000_003 + trainer.global_rank)
        elif len(states) != trainer.world_size:
            raise ValueError(f"the checkpoint holds the random state of {len(states)} process(es), this run has "
                             f"{trainer.world_size}; resume with the same number of processes")
        else:
            restore_random_state(states[trainer.global_rank])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_random_state() -> dict[str, Any]:
    """Plain containers and tensors only, so that checkpoints load with ``weights_only=True``."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    state = {"python": [version, list(python_state), python_gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    version, python_state, python_gauss = state["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointContent(pl.Callback):
    """Every checkpoint carries the run's identity (:func:`stedm.resume.identity`, checked before
    a run continues from it) and holds only what ``torch.load(weights_only=True)`` accepts: the
    hyper-parameters Lightning saves are reduced to plain values (a partial optimizer is left
    out: the model is always rebuilt from the config, never from them)."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = identity

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        from stedm.models.weights import plain

        checkpoint[IDENTITY_KEY] = self.identity
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(checkpoint[key], dropped=[])


class RunMetrics(pl.Callback):
    """Write the logged metrics at the end of fit (``fit/<name>``) and of every test
    (``<test_tag>/<name>``, the module's ``test_tag`` or ``test``) to ``run_metrics.json``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / RUN_METRICS

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, "fit")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, str(getattr(pl_module, "test_tag", "test")))

    def _record(self, trainer: pl.Trainer, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        metrics = json.loads(self.path.read_text()) if self.path.is_file() else {}
        metrics.update({f"{stage}/{k}": float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        self.path.write_text(json.dumps(metrics, indent=1, sort_keys=True))


EXPORT = "final.safetensors"


class ExportWeights(pl.Callback):
    """At the end of a finished ``fit`` (not one stopped by SIGTERM), write the final weights --
    the EMA ones where the module keeps an EMA (its ``ema_weights()``, or its own
    ``export_state_dict()``) -- as ``<run dir>/final.safetensors`` with a model card
    (:mod:`stedm.models.cards`: task, resolved config, data entries, metrics, provenance). The
    run's ``last.ckpt`` stays for resuming; a resumed run that finishes again writes a new export."""

    def __init__(self, run_dir: str | Path, cfg: Any) -> None:
        from omegaconf import OmegaConf

        self.path = Path(run_dir) / EXPORT
        self.config = OmegaConf.to_container(cfg, resolve=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from stedm.models.cards import write_weights

        if trainer.received_sigterm or not trainer.is_global_zero:
            return
        if hasattr(pl_module, "export_state_dict"):
            state, which = pl_module.export_state_dict()
        elif hasattr(pl_module, "ema_weights") and getattr(pl_module, "ema", None) is not None:
            with pl_module.ema_weights():
                state, which = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}, "ema"
        else:
            state, which = pl_module.state_dict(), "live"
        data = self.config.get("data") or {}
        card = {"task": self.config.get("task"), "run_name": self.config.get("run_name"), "weights_set": which,
                "module": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
                "data": {"name": data.get("name"), "ratios": data.get("ratios"), "entries": list(data["dataset"])
                         if isinstance(data.get("dataset"), dict) else data.get("dataset")},
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
                "step": trainer.global_step, "epoch": trainer.current_epoch, "config": self.config}
        if hasattr(pl_module, "export_card"):
            card.update(pl_module.export_card())
        if self.path.exists():
            log.info("%s: replaced by this run's new final weights", self.path)
        write_weights(self.path, state, card, overwrite=True)
