"""``predict_diff.py``: synthesise image/mask pairs with a trained StyleDiffusion checkpoint.

Pair ``i`` takes its layout from the first entry (labelled pool) and its style images from the
second (unlabelled pool); which items, their crops and the starting noise all derive from
``(seed, i)``, so pair ``i`` is the same whatever the batch size or number of processes.
Pairs land in ``<data_dir>/syn_data/<predict_dir>/`` as ``img_%05d.png`` + ``seg_%05d.png``,
each file written atomically; a pair counts as done once its line is in ``manifest.jsonl``.
With several processes (``location.devices``/``num_nodes``, started by Lightning Fabric) each
takes its share of the pairs still to do.
A restart skips done pairs; a folder written with another checkpoint or other settings is
refused unless ``overwrite=true``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from stedm.data.contract import tensor_to_image
from stedm.data.datamodule import build_dataset, entry_ratios
from stedm.data.io import write_png_atomic
from stedm.data.synthetic import MANIFEST, PAIR_IMAGE, PAIR_MASK, read_manifest
from stedm.data.transforms import train_transform
from stedm.run import prepare, resolve_precision
from stedm.tasks.diffusion import CONFIG_KEY, build_model

log = logging.getLogger(__name__)
SETTINGS = ".stedm_settings.json"
RANK_MANIFEST = "manifest.rank{}.jsonl"  # the records of rank > 0, until rank zero merges them


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


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: Path) -> torch.nn.Module:
    """Rebuild the model from the config that train_diff.py stored in the checkpoint, load it,
    and put its EMA weights in place (the weights it samples with) for good."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if CONFIG_KEY not in checkpoint:
        raise ValueError(f"{path} was not written by train_diff.py (it holds no '{CONFIG_KEY}')")
    model = build_model(checkpoint[CONFIG_KEY], lr=None)
    model.load_state_dict(checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)
    return model.bake_ema().eval()


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
        transform = train_transform(int(cfg.data.patch_size), **OmegaConf.to_container(cfg.data.augment or {}))
        self.layouts = build_dataset(cfg.data, names[0], "train", transform)
        self.styles = None
        if with_style:
            sampler = instantiate(cfg.style_sampling.sampler)
            self.styles = build_dataset(cfg.data, names[1], "train", transform, sampler)
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
def settings_of(cfg: DictConfig, checkpoint: Path) -> dict[str, Any]:
    """Everything that decides the pairs' content (not their number or the batch size)."""
    keys = ("seed", "sampler", "steps", "spacing", "cfg_scale", "rescale", "guidance_mode")
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": file_digest(checkpoint),
            "data": OmegaConf.to_container(cfg.data.dataset, resolve=True), "patch_size": int(cfg.data.patch_size),
            "style_sampling": OmegaConf.to_container(cfg.style_sampling, resolve=True),
            **{k: OmegaConf.to_container(cfg, resolve=True)[k] for k in keys}}


def open_output(folder: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Create or reuse ``folder`` and gather the pairs an earlier run finished into the manifest.
    Never mixes two settings."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = folder / SETTINGS
    has_pairs = any(folder.glob("img_*.png")) or (folder / MANIFEST).is_file()
    if stored.is_file():
        if json.loads(stored.read_text()) != settings and has_pairs:
            if not overwrite:
                raise FileExistsError(f"{folder} holds pairs written with another checkpoint or other settings; "
                                      "choose another +predict_dir, or pass overwrite=true to replace them")
            log.warning("overwrite=true: replacing the pairs in %s", folder)
            for path in [*folder.glob("*_*.png"), folder / MANIFEST, *folder.glob(RANK_MANIFEST.format("*"))]:
                path.unlink(missing_ok=True)
    elif any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty and was not written by predict_diff.py; "
                              "choose another +predict_dir, or pass overwrite=true")
    stored.write_text(json.dumps(settings, indent=1, sort_keys=True))
    merge_rank_manifests(folder)


def append_manifest(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("a") as fh:
        fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
        fh.flush()
        os.fsync(fh.fileno())


def merge_rank_manifests(folder: Path) -> None:
    """Move the records of the other ranks' manifests into ``manifest.jsonl`` (rank zero's job: it
    is the manifest's one writer). A line cut short by a kill is dropped: its pair is redone."""
    done = read_manifest(folder)
    for part in sorted(folder.glob(RANK_MANIFEST.format("*"))):
        records = []
        for line in part.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        append_manifest(folder / MANIFEST, [r for r in records if int(r["index"]) not in done])
        part.unlink()


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
    ctx = prepare(cfg)
    if not cfg.get("predict_dir"):
        raise ValueError("no output folder: pass +predict_dir=NAME (pairs go to <data_dir>/syn_data/NAME)")
    checkpoint = resolve_checkpoint(cfg)
    fabric = start_processes(cfg, ctx.devices)
    rank, world = fabric.global_rank, fabric.world_size
    model = load_model(checkpoint).to(fabric.device)
    with_style = model.style is not None
    folder = Path(cfg.location.data_dir) / "syn_data" / str(cfg.predict_dir)
    on_rank_zero_first(fabric, lambda: open_output(folder, settings_of(cfg, checkpoint), bool(cfg.overwrite)))
    done = read_manifest(folder)
    source = PairSource(cfg, with_style)
    total = int(cfg.num_pairs) if cfg.get("num_pairs") is not None else 2 * int(cfg.data.samples)
    todo = [i for i in range(total) if i not in done]
    mine = todo[rank::world]
    manifest = folder / (MANIFEST if rank == 0 else RANK_MANIFEST.format(rank))
    if rank == 0:
        log.info("%d pairs into %s: %d done, %d to go over %d process(es) (checkpoint %s)", total, folder,
                 len(done), len(todo), world, checkpoint)
    bf16 = resolve_precision(cfg.location).startswith("bf16")
    progress = tqdm(total=len(mine), unit="pair", desc="pairs", disable=not cfg.get("progress", True) or rank != 0)
    batch = int(cfg.batch_size)
    for start in range(0, len(mine), batch):
        indices = mine[start:start + batch]
        inputs = [source(i) for i in indices]
        masks = torch.stack([x["mask"] for x in inputs])
        styles = torch.stack([x["style"] for x in inputs]) if with_style else None
        with torch.autocast(fabric.device.type, dtype=torch.bfloat16, enabled=bf16):
            images = model.generate(masks, styles, seed=int(cfg.seed), indices=indices, sampler=cfg.sampler,
                                    steps=int(cfg.steps), spacing=cfg.spacing,
                                    cfg_scale=float(cfg.cfg_scale), rescale=float(cfg.rescale),
                                    guidance_mode=cfg.guidance_mode, batched_guidance=bool(cfg.batched_guidance),
                                    shared_trunk=bool(cfg.shared_trunk))
        records = []
        for i, x, image in zip(indices, inputs, tensor_to_image(images)):
            write_png_atomic(image, folder / PAIR_IMAGE.format(i))
            write_png_atomic(x["mask"].numpy().astype("uint8"), folder / PAIR_MASK.format(i))
            records.append({"index": i, "seed": int(cfg.seed), "sampler": cfg.sampler, "steps": int(cfg.steps),
                            "cfg_scale": float(cfg.cfg_scale), "checkpoint": str(checkpoint),
                            **{k: v for k, v in x.items() if k not in ("mask", "style")}})
        append_manifest(manifest, records)
        progress.update(len(indices))
    progress.close()
    fabric.barrier()
    if rank == 0:
        merge_rank_manifests(folder)
        log.info("wrote %s", folder)
    return folder
