"""See your data: ``python -m stedm.data.preview data=<x> [overrides ...]``.

Composes the ``train_diff`` config (so style sampling applies) with the given overrides,
prints per-entry counts, class frequencies and the effective epoch mix, and writes a PNG grid
of training samples (image | mask overlay | style images) to
``<result_dir>/preview/<data>.png`` (or ``--out PATH``).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from stedm.data.contract import IGNORE_INDEX, tensor_to_image
from stedm.data.datamodule import StedmDataModule

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240]], dtype=np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Class colours blended over the image; unlabelled pixels stay as they are."""
    colours = PALETTE[np.clip(mask, 0, len(PALETTE) - 1) % len(PALETTE)]
    blend = (0.55 * image + 0.45 * colours).astype(np.uint8)
    keep = (mask == IGNORE_INDEX) | (mask == 0)
    blend[keep] = image[keep]
    return blend


def sample_grid(batch: dict, rows: int) -> np.ndarray:
    """One row per sample: image | overlay | style images."""
    images = tensor_to_image(batch["image"][:rows])
    masks = batch["mask"][:rows].numpy()
    styles = tensor_to_image(batch["style"][:rows]) if "style" in batch else None
    lines = []
    for i in range(len(images)):
        tiles = [images[i], overlay(images[i], masks[i])]
        if styles is not None:
            tiles += list(styles[i])
        lines.append(np.concatenate(tiles, axis=1))
    return np.concatenate(lines, axis=0)


def class_frequencies(dataset, num_classes: int, limit: int = 64) -> dict[int, float]:
    counts: Counter = Counter()
    for i in range(min(len(dataset), limit)):
        record = dataset.load(i)
        if record.mask is not None:
            values, n = np.unique(record.mask, return_counts=True)
            counts.update(dict(zip(values.tolist(), n.tolist())))
    total = sum(counts.values())
    return {k: counts[k] / total for k in sorted(counts)} if total else {}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=demo style_sampling=augmented")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train_diff", overrides=args.overrides)
    torch.manual_seed(int(cfg.seed))
    sampler = instantiate(cfg.style_sampling.sampler)
    dm = StedmDataModule(cfg.data, batch_size=args.rows, seed=int(cfg.seed), style_sampler=sampler, eval_splits=())
    print(f"data={cfg.data.name}  classes={list(cfg.data.class_names)}  patch={cfg.data.patch_size}")
    mix = dm.epoch_mix()
    for name, dataset, ratio in zip(dm.names, dm.train_sets, dm.ratios):
        cases = len(set(dataset.cases()))
        kind = "labelled" if dataset.labelled else "unlabelled"
        print(f"  {name:<20} {kind:<10} items={len(dataset):<6} cases={cases:<5} ratio={ratio:<5g} "
              f"per epoch={mix[name]}")
        freqs = class_frequencies(dataset, int(cfg.data.num_classes))
        if freqs:
            names = list(cfg.data.class_names)
            print("    class frequency: " + ", ".join(
                f"{names[k] if 0 <= k < len(names) else k}={v:.3f}" for k, v in freqs.items()))
    total = sum(mix.values())
    print(f"  epoch: {total} items = " + " + ".join(f"{100 * n / total:.0f}% {k}" for k, n in mix.items()))
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    out = args.out or Path(cfg.location.result_dir) / "preview" / f"{cfg.data.name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample_grid(batch, args.rows)).save(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
