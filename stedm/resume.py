"""Which checkpoint a run continues from, and whether it may: the one start-of-run check.

A run is identified by everything that changes its result, not by its readable name. Every
checkpoint stores the run's *identity* (:func:`identity`): the whole resolved config as dotted
keys, with the paths under ``location.data_dir`` / ``location.result_dir`` written relative to
them, input weights (``pretrained``, ``*.weights_path``, ``*.pretrained_path``) by their sha256,
and the derived batch size, learning rate and world size. A run that would continue from a
checkpoint of another identity is refused, naming each differing key, unless the key is on the
allow-change list: :data:`ALLOWED_CHANGES` (paths, hardware, logging, how often to checkpoint,
training longer) plus the run's own ``allow_change`` patterns.

:func:`check_run_start` runs before anything is written: first as the Hydra callback
:class:`RunStartCheck` (before Hydra writes ``.hydra/`` and its log into the run folder), then
again in :func:`stedm.run.prepare` (for runs started without Hydra, and each job of a sweep).
It also checks that the run's folders can be written, and it picks the checkpoint to continue
from: ``last.ckpt``, or, when that cannot be read (a kill while it was replaced, a damaged
disk), the previous one, ``last.prev.ckpt``, which :class:`stedm.callbacks.LastCheckpoint`
keeps until its successor is complete and verified.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stedm.compat import upgrade_flat
from stedm.config import differences, flatten
from stedm.fileio import file_digest

log = logging.getLogger(__name__)

IDENTITY_KEY = "stedm_run_identity"
LAST, PREVIOUS = "last.ckpt", "last.prev.ckpt"
ALLOWED_CHANGES = (
    "location.*",  # hardware and paths; what they change (batch, lr, world size) is in derived.*
    "logger", "wandb", "main_metric", "resume", "allow_change", "test_checkpoints", "progress",
    "trainer.max_epochs", "trainer.max_steps",  # train longer (or stop sooner)
    "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "checkpoint.every_n_train_steps",
    "sampling.*", "model.sampling.*",  # how the sample grids are drawn: pictures, not training
)
"""Keys that may differ between a checkpoint and the run that continues from it."""
WITHOUT_CHECKPOINTS = ("predict_diff",)
"""Tasks that train nothing, so continue from nothing."""
WEIGHT_KEYS = ("pretrained", "weights_path", "pretrained_path")
"""Config keys (last part) that name input weights: identified by content, not path."""


# -- identity ------------------------------------------------------------------------------------
def identity(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity: its resolved config (no ``hydra``) as ``{dotted key: value}``."""
    from stedm.run import batch_size, learning_rate, resolve_devices

    container = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
                 for key in cfg if key != "hydra"}
    flat = flatten(container)
    roots = [(str(cfg.location.result_dir), "<result_dir>"), (str(cfg.location.data_dir), "<data_dir>")]
    for key, value in flat.items():
        if not isinstance(value, str):
            continue
        if key.rsplit(".", 1)[-1] in WEIGHT_KEYS and Path(value).expanduser().is_file():
            flat[key] = f"sha256:{file_digest(Path(value).expanduser())}"
        else:
            for root, name in roots:
                flat[key] = flat[key].replace(root, name)
    world = resolve_devices(cfg.location) * int(cfg.location.num_nodes)
    batch = batch_size(cfg)
    flat.update({"derived.world_size": world, "derived.batch_size": batch,
                 "derived.lr": learning_rate(cfg, batch, world)})
    return flat


def allowed_changes(cfg: DictConfig) -> list[str]:
    return [*ALLOWED_CHANGES, *[str(p) for p in (cfg.get("allow_change") or [])]]


# -- checkpoints ---------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """A checkpoint of ours, read without executing code (``weights_only``); ``mmap`` leaves the
    tensors on disk until used, so reading the identity of a large checkpoint is cheap."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def readable(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(checkpoint, None)`` if ``path`` loads, else ``(None, why)``."""
    try:
        return read_checkpoint(path), None
    except Exception as error:  # noqa: BLE001 - any failure to read means: not usable
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


@dataclass
class Start:
    """What a run starts from: ``checkpoint`` None for a fresh run."""

    checkpoint: Path | None
    note: str | None = None
    stored_identity: dict[str, Any] | None = None  # the checkpoint's, read once with the checkpoint


def choose_checkpoint(checkpoint_dir: Path) -> Start:
    """``last.ckpt``, or ``last.prev.ckpt`` when the latest cannot be read; None if neither exists."""
    last, previous = checkpoint_dir / LAST, checkpoint_dir / PREVIOUS
    candidates = [p for p in (last, previous) if p.is_file()]
    if not candidates:
        return Start(None)
    failures = []
    for path in candidates:
        checkpoint, why = readable(path)
        if checkpoint is not None:
            note = None
            if failures:
                note = (f"{failures[0][0]} cannot be read ({failures[0][1]}); continuing from the previous "
                        f"checkpoint {path}")
            return Start(path, note, checkpoint.get(IDENTITY_KEY))
        failures.append((path, why))
    raise RuntimeError(
        "resume=auto: no checkpoint of this run can be read: "
        + "; ".join(f"{p} ({why})" for p, why in failures)
        + f". Move {checkpoint_dir} away to start afresh, or give the run another name (run_name=...)")


def run_checkpoint_dir(cfg: DictConfig) -> Path:
    return Path(cfg.location.result_dir) / "checkpoints" / str(cfg.run_name)


def check_run_start(cfg: DictConfig, write_check: bool = True) -> Start:
    """Refuse, before anything is written, a run that would resume the wrong model or could not
    save its work (``write_check``: prove its checkpoint folder writable); return the checkpoint
    it continues from."""
    resume = cfg.get("resume", "auto")
    checkpoint_dir = run_checkpoint_dir(cfg)
    if resume in (None, False, "false"):
        if checkpoint_dir.is_dir() and any(checkpoint_dir.glob("*.ckpt")):
            raise FileExistsError(
                f"resume=false, but {checkpoint_dir} already holds checkpoints of an earlier run named "
                f"'{cfg.run_name}'; pass resume=auto to continue it, or change seed/run_name to start another")
        start = Start(None)
    elif resume == "auto":
        start = choose_checkpoint(checkpoint_dir)
    else:
        path = Path(str(resume))
        if not path.is_file():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint")
        checkpoint, why = readable(path)
        if why is not None:
            raise ValueError(f"resume={resume}: cannot be read safely ({why}); give a checkpoint written by "
                             "this project, or convert one with `python -m stedm.weights convert`")
        start = Start(path, stored_identity=checkpoint.get(IDENTITY_KEY))
    if start.checkpoint is not None:
        check_identity(cfg, start.checkpoint, start.stored_identity)
    if write_check:
        check_writable(checkpoint_dir, "location.result_dir")
    return start


def check_identity(cfg: DictConfig, path: Path, stored: dict[str, Any] | None) -> None:
    """Refuse to continue ``path`` (whose stored identity is ``stored``) with other settings."""
    if stored is None:
        log.warning("%s holds no run identity (written by an older version): continuing without checking that "
                    "its settings match this run's", path)
        return
    changed = differences(upgrade_flat(stored), identity(cfg), allowed_changes(cfg))  # read at today's keys
    if changed:
        raise ValueError(
            f"resume: {path} was trained with other settings than this run ('{cfg.run_name}'):\n  "
            + "\n  ".join(changed)
            + "\nNothing was written. To start a fresh run with these settings, give it another name "
              f"(run_name={cfg.run_name}-v2, or any name); to continue the old run, use its settings; to "
              "continue it with a changed key on purpose, add the key to allow_change (e.g. "
              f"'allow_change=[{changed[0].split(':')[0]}]').")


def check_writable(directory: Path, key: str) -> None:
    """Prove a file can be written in ``directory`` (or, if it does not exist yet, in its nearest
    existing parent, which creates nothing): as root, permission bits are no proof, a read-only
    mount is found only by trying."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory", str(existing))
        probe = existing / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"{directory} cannot be written ({error.strerror or error}: {existing}); set {key} "
                              "to a folder you can write") from error


# -- Hydra ----------------------------------------------------------------------------------------
class RunStartCheck(Callback):
    """:func:`check_run_start` before Hydra writes into the run folder (single runs; each job of a
    sweep is checked by :func:`stedm.run.prepare` inside its own, new job folder)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from stedm.cluster import is_rank_zero_process

        if "run_name" not in config or config.get("task") in WITHOUT_CHECKPOINTS or not is_rank_zero_process():
            return
        try:
            check_run_start(config)
        except (ValueError, OSError, RuntimeError) as error:
            # Hydra turns a callback's exceptions into warnings; exiting stops the run here.
            raise SystemExit(f"Error: {error}") from error

