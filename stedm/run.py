"""What every entry script shares: paths, seeding, hardware checks, batch/lr scaling, Trainer.

Batch size and learning rate are computed here and nowhere else:
``batch = data.batch_base x location.batch_mul`` (per process) and
``lr = base_lr x batch x world_size`` unless ``lr`` is given (docs/method.md, 1 STEDM; gradient accumulation
is deliberately not part of the scaling, as in the paper).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from stedm.cluster import adopt_submitit_local_tasks, cluster_plugins, is_rank_zero_process
from stedm.compat import refuse_stale_keys
from stedm.resume import Start, check_run_start, identity, run_checkpoint_dir

log = logging.getLogger(__name__)


# -- hardware ----------------------------------------------------------------------------------
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: the CPUs on which bf16 matmuls beat fp32 (elsewhere they are far slower)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def uses_cuda(location: DictConfig) -> bool:
    return location.accelerator in ("gpu", "cuda") or (location.accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(location: DictConfig) -> str:
    """``auto`` -> bf16-mixed where the hardware runs it fast, else 32-true."""
    if location.precision != "auto":
        return str(location.precision)
    if uses_cuda(location):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def resolve_devices(location: DictConfig) -> int:
    """Processes per node; refuses a location that asks for more GPUs than there are."""
    devices = location.devices
    if uses_cuda(location):
        available = torch.cuda.device_count()
        wanted = available if devices == "auto" else (len(devices) if not isinstance(devices, int) else devices)
        if wanted < 1 or wanted > available:
            raise RuntimeError(
                f"location.devices={devices} (location={location.name}) asks for {wanted} GPU(s) but this "
                f"machine has {available}; use location=local or set location.devices")
        return wanted
    return 1 if devices == "auto" else int(devices if isinstance(devices, int) else len(devices))


def resolve_num_workers(location: DictConfig) -> int:
    if location.num_workers != "auto":
        return int(location.num_workers)
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if uses_cuda(location) else 0


# -- run context -------------------------------------------------------------------------------
@dataclass
class RunContext:
    run_dir: Path
    checkpoint_dir: Path
    devices: int
    world_size: int
    batch_size: int
    lr: float | None
    precision: str
    num_workers: int
    start: Start


def batch_size(cfg: DictConfig) -> int:
    return int(cfg.data.batch_base) * int(cfg.location.batch_mul)


def learning_rate(cfg: DictConfig, batch: int, world_size: int) -> float | None:
    if cfg.get("lr") is not None:
        return float(cfg.lr)
    if cfg.get("base_lr") is None:
        return None
    return float(cfg.base_lr) * batch * world_size


def run_dir(cfg: DictConfig) -> Path:
    """Hydra's run directory, or the same layout when called outside a Hydra app (tests)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    path = Path(cfg.location.result_dir) / "runs" / cfg.task / cfg.run_name
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare(cfg: DictConfig, trains: bool = True) -> RunContext:
    """Validate the location, check where the run starts from (:func:`stedm.resume.check_run_start`:
    a run that would continue another run's checkpoint or could not save is refused before
    anything is written), seed everything, and compute the run's derived settings. A config that
    still uses a renamed key is refused first (:func:`stedm.compat.refuse_stale_keys`)."""
    refuse_stale_keys(cfg)
    adopt_submitit_local_tasks()
    devices = resolve_devices(cfg.location)
    start = check_run_start(cfg) if trains else Start(None)
    world = devices * int(cfg.location.num_nodes)
    batch = batch_size(cfg)
    pl.seed_everything(int(cfg.seed), workers=True)
    if uses_cuda(cfg.location):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as the paper
    directory = run_dir(cfg)
    ctx = RunContext(run_dir=directory,
                     checkpoint_dir=run_checkpoint_dir(cfg),
                     devices=devices, world_size=world, batch_size=batch,
                     lr=learning_rate(cfg, batch, world), precision=resolve_precision(cfg.location),
                     num_workers=resolve_num_workers(cfg.location), start=start)
    if is_rank_zero_process():
        (directory / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if start.note:
        log.warning(start.note)
    log.info("run %s: dir %s, %d process(es), batch %d/process, lr %s, precision %s%s",
             cfg.run_name, directory, world, batch, ctx.lr, ctx.precision,
             f", continuing from {start.checkpoint}" if start.checkpoint else "")
    return ctx


def fit(cfg: DictConfig, ctx: RunContext, trainer: pl.Trainer, model: pl.LightningModule, datamodule) -> None:
    """``trainer.fit``, continuing from the checkpoint :func:`prepare` chose (read without
    executing code: our checkpoints hold plain values and tensors only). A run stopped by SIGTERM
    (SLURM's preemption and time-out signal) saves its work and exits with status 143, so that
    neither a scheduler nor a sweep summary takes it for finished."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from stedm.hydra_callbacks import record_interrupted

    checkpoint = str(ctx.start.checkpoint) if ctx.start.checkpoint else None
    try:
        model = apply_channels_last(cfg, model, ctx.precision)
        trainer.fit(maybe_compile(cfg, model), datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
        stopped = trainer.received_sigterm
    except SIGTERMException:
        stopped = True
    if stopped:
        record_interrupted(f"stopped by SIGTERM at step {trainer.global_step}; started again, it continues from "
                           f"{ctx.checkpoint_dir / 'last.ckpt'}")
        raise SystemExit(143)


# -- trainer -----------------------------------------------------------------------------------
def build_loggers(cfg: DictConfig, ctx: RunContext) -> list:
    from pytorch_lightning import loggers

    built = []
    for name in cfg.get("logger") or []:
        if name == "csv":
            from stedm.logs import AppendingCSVLogger

            built.append(AppendingCSVLogger(ctx.run_dir, name="logs", version=""))
        elif name == "tensorboard":
            built.append(loggers.TensorBoardLogger(ctx.run_dir, name="tensorboard", version=""))
        elif name == "wandb":
            try:
                import wandb  # noqa: F401  (WandbLogger's own error does not say which extra)
            except ImportError:
                raise ImportError("logger=[wandb] needs the wandb package: pip install -e .[wandb]") from None
            options = cfg.get("wandb") or {}
            built.append(loggers.WandbLogger(project=options.get("project") or "stedm", entity=options.get("entity"),
                                             name=cfg.run_name, save_dir=str(ctx.run_dir)))
        else:
            raise ValueError(f"logger={name} is unknown; choose from csv, tensorboard, wandb")
    return built


def build_callbacks(cfg: DictConfig, ctx: RunContext) -> list[pl.Callback]:
    """``last.ckpt`` (:class:`~stedm.callbacks.LastCheckpoint`), the best checkpoints by
    ``checkpoint.monitor`` if set, random states, final metrics and the final weights as
    safetensors with a model card (:mod:`stedm.callbacks`)."""
    from pytorch_lightning import callbacks

    from stedm.callbacks import CheckpointContent, ExportWeights, LastCheckpoint, RandomState, RunMetrics

    ckpt = cfg.checkpoint
    built: list[pl.Callback] = []
    if ckpt.get("monitor"):  # first: trainer.checkpoint_callback is the one that knows the best
        built.append(callbacks.ModelCheckpoint(
            dirpath=ctx.checkpoint_dir, monitor=ckpt.monitor, mode=ckpt.mode, save_top_k=int(ckpt.save_top_k),
            filename="best-{epoch:03d}-{step:07d}", auto_insert_metric_name=False))
    built += [LastCheckpoint(ctx.checkpoint_dir, ckpt.get("every_n_train_steps")), RandomState(int(cfg.seed)),
              RunMetrics(ctx.run_dir), CheckpointContent(identity(cfg)), ExportWeights(ctx.run_dir, cfg)]
    if cfg.trainer.get("enable_progress_bar", True):
        built.append(callbacks.TQDMProgressBar(refresh_rate=10))
    return built


def build_trainer(cfg: DictConfig, ctx: RunContext, **overrides: Any) -> pl.Trainer:
    """The Trainer of every script: location decides hardware, ``trainer.*`` the schedule."""
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    loggers = build_loggers(cfg, ctx)
    options.update(
        accelerator=cfg.location.accelerator, devices=ctx.devices, num_nodes=int(cfg.location.num_nodes),
        strategy=build_strategy(cfg.location), precision=ctx.precision, default_root_dir=str(ctx.run_dir),
        logger=loggers or False, callbacks=build_callbacks(cfg, ctx), plugins=cluster_plugins(),
        use_distributed_sampler=False,  # our samplers shard by rank themselves (stedm.data.mixing)
    )
    options.update(overrides)
    return pl.Trainer(**options)


def build_strategy(location: DictConfig, fabric: bool = False) -> Any:
    """``location.strategy`` for a Trainer (or, ``fabric=True``, for Lightning Fabric), with
    ``location.backend`` (e.g. ``nccl``) as DDP's process-group backend when given (null:
    Lightning's choice, nccl on GPUs and gloo on CPUs)."""
    backend = location.get("backend")
    if not backend:
        return location.strategy
    if location.strategy != "ddp":
        raise ValueError(f"location.backend={backend} sets the backend of strategy=ddp, but location.strategy="
                         f"{location.strategy}; use strategy ddp or backend null")
    if fabric:
        from lightning_fabric.strategies import DDPStrategy
    else:
        from pytorch_lightning.strategies import DDPStrategy
    return DDPStrategy(process_group_backend=str(backend))


def maybe_compile(cfg: DictConfig, module: pl.LightningModule) -> pl.LightningModule:
    """Compile the module's networks in place when ``location.compile`` asks for it (true or a
    ``torch.compile`` mode). A LightningModule's training step calls its networks directly, not
    its ``forward``, so the networks it names in ``compile_targets`` are compiled, each in place
    (``nn.Module.compile``): parameter names and checkpoints stay as they are."""
    mode = cfg.location.get("compile")
    if not mode:
        return module
    targets = getattr(module, "compile_targets", ())
    if not targets:
        raise ValueError(f"location.compile={mode!r}, but {type(module).__name__} names no compile_targets; "
                         "set location.compile=false")
    for name in targets:
        getattr(module, name).compile(mode=None if mode is True or mode == "default" else str(mode))
    return module


def uses_channels_last(location: DictConfig, precision: str) -> bool:
    """``location.channels_last``: ``auto`` (default) -> on exactly when training runs ``bf16-mixed``
    (oneDNN's bf16 convolutions want NHWC; fp32 runs stay as they are, bit for bit), or true/false."""
    value = location.get("channels_last", "auto")
    if value == "auto":
        return str(precision).startswith("bf16")
    if isinstance(value, bool):
        return value
    raise ValueError(f"location.channels_last={value!r}; choose auto, true or false")


def apply_channels_last(cfg: DictConfig, module: pl.LightningModule, precision: str) -> pl.LightningModule:
    """Let ``module`` feed its networks channels-last activations when :func:`uses_channels_last`
    says so. The weights stay contiguous (fp32 master weights in NCHW keep the fused optimizer and
    the EMA fast); a module that supports it has a ``channels_last`` attribute."""
    wanted = uses_channels_last(cfg.location, precision)
    if not hasattr(module, "channels_last"):
        if cfg.location.get("channels_last", "auto") is True:
            raise ValueError(f"location.channels_last=true, but {type(module).__name__} has no channels-last "
                             "training path; set location.channels_last=auto")
        return module
    module.channels_last = wanted
    return module


def channels_last_input(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``x`` in channels-last memory format when ``enabled`` (same values; 4-D tensors only), else ``x``."""
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.ndim == 4 else x


# -- data --------------------------------------------------------------------------------------
def build_datamodule(cfg: DictConfig, ctx: RunContext, eval_splits=("val", "test"), with_style: bool = True):
    """The DataModule for this run; the style source comes from ``style_sampling`` when asked."""
    from hydra.utils import instantiate

    from stedm.data.datamodule import StedmDataModule

    source = instantiate(cfg.style_sampling.source) if with_style and "style_sampling" in cfg else None
    return StedmDataModule(cfg.data, batch_size=ctx.batch_size, num_workers=ctx.num_workers, seed=int(cfg.seed),
                           style_source=source, eval_splits=eval_splits,
                           pin_memory=uses_cuda(cfg.location), cache_dir=Path(cfg.location.result_dir) / "cache",
                           batch_mul=cfg.location.batch_mul)
