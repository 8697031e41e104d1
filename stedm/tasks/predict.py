"""``predict_diff.py``: synthesise image/mask pairs with a trained StyleDiffusion checkpoint.

Pair ``i`` takes its layout from the first entry (labelled pool) and its style images from the
second (unlabelled pool); which items, their crops and the starting noise all derive from
``(seed, i)``, so pair ``i`` is the same whatever the batch size or number of processes.
Pairs land in ``<data_dir>/syn_data/<predict_dir>/`` as ``img_%05d.png`` + ``seg_%05d.png``,
each file written atomically; a pair counts as done once its line is in ``manifest.jsonl``.
With several processes (``location.devices``/``num_nodes``, started by Lightning Fabric) each
takes its share of the pairs still to do.
A restart skips done pairs; a folder written with another checkpoint or other settings is
refused (naming each differing setting) unless ``overwrite=true``.

The checkpoint is read without running code (``weights_only``), and the ``_target_`` values of
the model config it stores must be ours or listed in ``trusted_targets``. The model is rebuilt
from that config, so ``style_agg``/``preset``/``diffusion`` given on the command line must agree
with the ones the checkpoint was trained with; ``style_sampling`` defaults to the training one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

from stedm.compat import refuse_stale_keys, upgrade
from stedm.config import differences
from stedm.data.contract import tensor_to_image
from stedm.data.datamodule import entry_ratios, train_dataset
from stedm.data.io import write_png_atomic
from stedm.data.pair_folder import (MANIFEST, PAIR_IMAGE, PAIR_MASK, RANK_MANIFEST, append_manifest, layout_class_names,
                                    merge_rank_manifests, open_output, read_manifest)
from stedm.diffusion.options import SamplingOptions, run_options
from stedm.fileio import file_digest
from stedm.models.style import null_style_like
from stedm.models.weights import load_safely
from stedm.run import prepare, resolve_precision
from stedm.tasks.diffusion import CHOICES_KEY, CONFIG_KEY, build_model, check_random_first_stage, prediction_config

log = logging.getLogger(__name__)
# _target_ values a checkpoint's stored config may name besides stedm.* (those conf/ uses);
# users add their own with trusted_targets=[...]
TRUSTED_TARGETS = ("torch.optim.Adam", "torch.optim.AdamW")
# choices the model is rebuilt from: given on the command line, they must match the checkpoint
MODEL_CHOICES = ("preset", "diffusion", "style_agg")


# -- arguments ---------------------------------------------------------------------------------
def check_arguments(cfg: DictConfig) -> SamplingOptions:
    """Refuse impossible settings before a checkpoint is read or a folder is made; returns the
    run's sampling options (conf/sampling and its aliases), each checked."""
    if not cfg.get("predict_dir"):
        raise ValueError("no output folder: pass +predict_dir=NAME (pairs go to <data_dir>/syn_data/NAME)")
    refuse_stale_keys(cfg)
    if cfg.get("num_pairs") is not None and (not isinstance(cfg.num_pairs, int) or cfg.num_pairs < 1):
        raise ValueError(f"num_pairs={cfg.num_pairs}: give a positive number of pairs (null = 2 x data.samples)")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(f"batch_size={cfg.batch_size}: give a positive number of pairs per batch")
    return run_options(cfg)


# -- checkpoint --------------------------------------------------------------------------------
def resolve_checkpoint(cfg: DictConfig) -> Path:
    """``+ckpt_name``: a file or run folder under ``result_dir/checkpoints/``, or a path."""
    name = cfg.get("ckpt_name")
    if not name:
        raise ValueError("no checkpoint given: pass +ckpt_name=RUN_NAME (a folder under "
                         f"{Path(cfg.location.result_dir) / 'checkpoints'}), RUN_NAME/last.ckpt, or a path")
    root = Path(cfg.location.result_dir) / "checkpoints"
    for candidate in (Path(str(name)), root / str(name)):
        if candidate.is_dir():
            candidate = candidate / "last.ckpt"
        if candidate.is_file():
            return candidate.resolve()
    known = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise FileNotFoundError(f"ckpt_name={name}: no checkpoint at {root / str(name)}; runs there: {known}")


def read_checkpoint(path: Path, trusted: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The checkpoint, read without running code, whose stored configs name trusted targets only."""
    checkpoint = load_safely(path, "ckpt_name", ".ckpt")
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint:
        raise ValueError(f"ckpt_name: {path} was not written by train_diff.py (it holds no '{CONFIG_KEY}')")
    check_targets({CONFIG_KEY: checkpoint[CONFIG_KEY], CHOICES_KEY: checkpoint.get(CHOICES_KEY)}, trusted, path)
    return checkpoint


def check_targets(config: Any, trusted: list[str] | tuple[str, ...], path: Path, where: str = "") -> None:
    """Every ``_target_`` in ``config`` (nested anywhere) is ``stedm.*``, one of
    :data:`TRUSTED_TARGETS`, or listed in ``trusted`` (``trusted_targets``; an entry ending in
    ``.`` trusts a whole package): instantiating the config calls them."""
    allowed = (*TRUSTED_TARGETS, *trusted)
    if isinstance(config, dict):
        target = config.get("_target_")
        if target is not None and not (str(target).startswith("stedm.") or any(
                str(target) == a or (a.endswith(".") and str(target).startswith(a)) for a in allowed)):
            raise ValueError(f"ckpt_name: {path} stores a model config naming _target_={target!r} (at "
                             f"{where or 'top level'}), which is not ours and not in trusted_targets; "
                             f"if you trust it, pass 'trusted_targets=[{target}]'")
        for key, value in config.items():
            check_targets(value, trusted, path, f"{where}.{key}" if where else str(key))
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            check_targets(value, trusted, path, f"{where}[{i}]")


def load_model(checkpoint: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the model from the config that train_diff.py stored in the checkpoint, load it,
    and put its EMA weights in place (the weights it samples with) for good. The first stage's
    weights come from the checkpoint, not from its ``weights_path`` (:func:`prediction_config`)."""
    model = build_model(prediction_config(checkpoint), lr=None)
    model.load_state_dict(checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)
    return model.bake_ema().eval()


# -- choices the checkpoint was trained with ----------------------------------------------------
def resolve_choices(cfg: DictConfig, checkpoint: dict[str, Any], path: Path) -> DictConfig:
    """``cfg`` with ``style_sampling``/``preset``/``diffusion``/``style_agg`` filled in from the
    checkpoint where not given; refuses given ``preset``/``diffusion``/``style_agg`` that
    contradict the checkpoint (resolved alongside its other choices), and a ``style_sampling``
    other than the training one unless ``allow_style_sampling_change=true``."""
    trained = upgrade(checkpoint.get(CHOICES_KEY))  # today's keys, also for an older checkpoint
    named = [key for key in ("style_sampling", *MODEL_CHOICES) if cfg.get(key) is not None]
    if trained is None:
        if named:
            log.warning("ckpt_name: %s records no training choices (written before they were stored); %s "
                        "cannot be checked against it", path, ", ".join(named))
        if "style_sampling" not in named:
            raise ValueError(f"ckpt_name: {path} does not record its style_sampling; pass style_sampling=NAME")
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in ("style_sampling", *MODEL_CHOICES):  # interpolations of the given ones see these
            if key not in named:
                cfg[key] = trained[key]
    given = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in named}
    for key in MODEL_CHOICES:
        if key in given and given[key] != trained[key]:
            changed = differences({key: trained[key]}, {key: given[key]})
            raise ValueError(
                f"{key}={given[key].get('name')}: the checkpoint {path} was trained with {key}={trained[key].get('name')} "
                f"and the model is rebuilt from it ({'; '.join(changed[:6])}); drop {key}=... or pass "
                f"{key}={trained[key].get('name')}")
    with open_dict(cfg):
        if "style_sampling" in given and given["style_sampling"] != trained["style_sampling"]:
            old, new = trained["style_sampling"].get("name"), given["style_sampling"].get("name")
            changed = "; ".join(differences({"style_sampling": trained["style_sampling"]},
                                            {"style_sampling": given["style_sampling"]})[:6])
            if not cfg.get("allow_style_sampling_change"):
                raise ValueError(f"style_sampling={new}: the checkpoint {path} was trained with style_sampling={old} "
                                 f"({changed}); drop style_sampling=... to use the training one, or pass "
                                 "allow_style_sampling_change=true to sample styles differently on purpose")
            if int(trained["style_sampling"]["num_images"]) == 0:
                raise ValueError(f"style_sampling={new}: the checkpoint {path} was trained with style_sampling=none "
                                 "and has no style path, so style images cannot be used; drop style_sampling=...")
            log.warning("style_sampling=%s on a checkpoint trained with style_sampling=%s (%s)%s", new, old, changed,
                        "; no style: pairs sampled with the null style (unconditional)"
                        if int(given["style_sampling"]["num_images"]) == 0 else "")
            cfg.style_sampling_trained = trained["style_sampling"]
    return cfg


# -- pairs -------------------------------------------------------------------------------------
class PairSource:
    """Layout and style inputs of pair ``i``, reproducible from ``(seed, i)`` alone."""

    def __init__(self, cfg: DictConfig, with_style: bool) -> None:
        from hydra.utils import instantiate

        names = list(cfg.data.dataset.keys())
        entry_ratios(cfg.data)  # same checks as training
        if with_style and len(names) < 2:
            raise ValueError(f"predict_diff needs two entries, layouts then styles: data/dataset=[x_anno,x_unanno] "
                             f"(got {names})")
        self.layouts = train_dataset(cfg.data, names[0])
        self.styles = train_dataset(cfg.data, names[1], instantiate(cfg.style_sampling.source)) if with_style else None
        self.seed = int(cfg.seed)

    def __call__(self, i: int) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + i)
            j = int(torch.randint(len(self.layouts), ()).item())
            layout = self.layouts[j]
            record = {"mask": layout["mask"], "layout_source": layout["meta"]["source"], "layout_index": j,
                      "layout_case": layout["meta"]["case"]}
            if self.styles is not None:
                k = int(torch.randint(len(self.styles), ()).item())
                style = self.styles[k]
                record.update(style=style["style"], style_source=style["meta"]["source"], style_index=k,
                              style_case=style["meta"]["case"])
        return record


# -- output folder -----------------------------------------------------------------------------
def settings_of(cfg: DictConfig, checkpoint: Path, layout_classes: int | None = None,
                options: SamplingOptions | None = None) -> dict[str, Any]:
    """Everything that decides what a pair is (not their number, the batch size, or how a pair
    is computed: ``batched_guidance``/``shared_trunk`` agree within 2/255; not the checkpoint's
    path either, only its content). ``layout_classes``: the label space of the masks written
    (the model's layout: 2 with ``data.binary_layout``), read back by ``*_syn`` entries.
    ``options``: the run's sampling options (default :func:`run_options` of ``cfg``); the solver is
    recorded as ``sampler``, the key folders have always had."""
    options = options or run_options(cfg)
    sampling = {"sampler": options.solver, **{k: getattr(options, k) for k in
                                              ("steps", "spacing", "cfg_scale", "rescale", "guidance_mode")}}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    settings = {"checkpoint_sha256": file_digest(checkpoint), "data": resolved["data"]["dataset"],
                "data_augment": resolved["data"].get("augment"), "num_classes": resolved["data"]["num_classes"],
                "patch_size": int(cfg.data.patch_size), "style_sampling": resolved["style_sampling"],
                "seed": resolved["seed"], **sampling}
    if layout_classes is not None:
        settings["layout_classes"] = int(layout_classes)
        settings["class_names"] = layout_class_names(resolved["data"], int(layout_classes))
    if cfg.get("style_sampling_trained") is not None:
        settings["style_sampling_trained"] = resolved["style_sampling_trained"]
    return settings


# -- processes ---------------------------------------------------------------------------------
def start_processes(cfg: DictConfig, devices: int):
    """Lightning Fabric with the location's processes (started here when it launches them itself;
    under SLURM or submitit they exist already). Only used for ranks, barriers and devices: every
    rank samples its own pairs, no gradients cross processes."""
    from lightning_fabric import Fabric

    from stedm.run import build_strategy

    fabric = Fabric(accelerator=cfg.location.accelerator, devices=devices, num_nodes=int(cfg.location.num_nodes),
                    strategy=build_strategy(cfg.location, fabric=True))
    fabric.launch()
    return fabric


def on_rank_zero_first(fabric, work) -> None:
    """Run ``work()`` on rank zero while the other ranks wait; its error stops every rank."""
    error = None
    if fabric.is_global_zero:
        try:
            work()
        except Exception as caught:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
            error = caught
    message = fabric.broadcast(None if error is None else f"{type(error).__name__}: {error}", src=0)
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 stopped: {message}")


# -- the task ----------------------------------------------------------------------------------
def predict_pairs(cfg: DictConfig) -> Path:
    """Pairs ``0 .. num_pairs-1`` into ``<data_dir>/syn_data/<predict_dir>/``: the pairs not done yet
    are shared out over the processes (rank ``r`` takes every ``world``-th), so the folder holds the
    same pairs whatever their number. Rank zero alone writes the settings and ``manifest.jsonl``
    (other ranks record theirs in ``manifest.rank<r>.jsonl``, merged into it at the end)."""
    options = check_arguments(cfg)
    path = resolve_checkpoint(cfg)
    checkpoint = read_checkpoint(path, [str(t) for t in cfg.get("trusted_targets") or []])
    cfg = check_random_first_stage(cfg, checkpoint, path)
    cfg = resolve_choices(cfg, checkpoint, path)
    model = load_model(checkpoint)
    del checkpoint
    options.check_schedule(model.noise_scheduler)
    ctx = prepare(cfg, trains=False)
    fabric = start_processes(cfg, ctx.devices)
    rank, world = fabric.global_rank, fabric.world_size
    model = model.to(fabric.device)
    folder = Path(cfg.location.data_dir) / "syn_data" / str(cfg.predict_dir)
    on_rank_zero_first(fabric, lambda: open_output(folder, settings_of(cfg, path, model.layout_channels, options),
                                                     bool(cfg.overwrite)))
    done = read_manifest(folder)
    source = PairSource(cfg, with_style=int(cfg.style_sampling.num_images) > 0)
    null_style = model.style is not None and source.styles is None  # style_sampling=none, opted in
    trained_images = int(cfg.style_sampling_trained.num_images) if null_style else 0
    total = int(cfg.num_pairs) if cfg.get("num_pairs") is not None else 2 * int(cfg.data.samples)
    todo = [i for i in range(total) if i not in done]
    mine = todo[rank::world]
    manifest = folder / (MANIFEST if rank == 0 else RANK_MANIFEST.format(rank))
    if rank == 0:
        log.info("%d pairs into %s: %d done, %d to go over %d process(es) (checkpoint %s)", total, folder,
                 len(done), len(todo), world, path)
    bf16 = resolve_precision(cfg.location).startswith("bf16")
    progress = tqdm(total=len(mine), unit="pair", desc="pairs", disable=not cfg.get("progress", True) or rank != 0)
    batch = int(cfg.batch_size)
    for start in range(0, len(mine), batch):
        indices = mine[start:start + batch]
        inputs = [source(i) for i in indices]
        masks = torch.stack([x["mask"] for x in inputs])
        if null_style:
            styles = null_style_like(torch.zeros(len(indices), trained_images, 3, *masks.shape[-2:]))
        else:
            styles = torch.stack([x["style"] for x in inputs]) if source.styles is not None else None
        with torch.autocast(fabric.device.type, dtype=torch.bfloat16, enabled=bf16):
            images = model.generate(masks, styles, seed=int(cfg.seed), indices=indices, sampling=options)
        records = []
        for i, x, image in zip(indices, inputs, tensor_to_image(images)):
            write_png_atomic(image, folder / PAIR_IMAGE.format(i))
            # the mask in the layout's label space: what the image was conditioned on
            write_png_atomic(model.layout_classes(x["mask"][None])[0].numpy().astype("uint8"),
                             folder / PAIR_MASK.format(i))
            records.append({"index": i, "seed": int(cfg.seed), "sampler": options.solver, "steps": options.steps,
                            "cfg_scale": float(options.cfg_scale), "checkpoint": str(path),
                            **{k: v for k, v in x.items() if k not in ("mask", "style")}})
        append_manifest(manifest, records)
        progress.update(len(indices))
    progress.close()
    fabric.barrier()
    if rank == 0:
        merge_rank_manifests(folder)
        from stedm.viz import pair_folder_sheet

        log.info("wrote %s (contact sheet %s)", folder, pair_folder_sheet(folder))
    return folder
