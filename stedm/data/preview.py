"""See your data: ``python -m stedm.data.preview data=<x> [overrides ...]``.

Composes the ``train_diff`` config (so style sampling applies) with the given overrides,
prints per-entry counts, class frequencies and the effective epoch mix, warns when images are
smaller than ``data.patch_size`` (training mirror-pads them), and writes a contact sheet
(:func:`stedm.viz.contact_sheet`: titled columns image | overlay | mask | style images, one
labelled row per sample, the class legend in the data setting's palette) of training samples and
of ``--eval-rows`` val/test samples each, to ``<result_dir>/preview/<data>.png`` (or ``--out PATH``).
"""

from __future__ import annotations

import argparse
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from stedm.data.contract import tensor_to_image
from stedm.data.datamodule import StedmDataModule
from stedm.viz import class_palette, colour_mask, contact_sheet, overlay

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
TILE = 192
"""Pixels per tile side in the sheet (small patches are enlarged, nearest neighbour)."""
SURVEYED = 64
"""Items per entry whose class frequencies and sizes are reported."""


def sample_rows(batch: dict, rows: int, palette: np.ndarray) -> tuple[list[list[np.ndarray]], list[str]]:
    """Training rows: image | overlay | mask | style images, labelled by entry and case."""
    images = tensor_to_image(batch["image"][:rows])
    masks = batch["mask"][:rows].numpy()
    styles = tensor_to_image(batch["style"][:rows]) if "style" in batch else None
    meta = batch.get("meta", {})
    lines, labels = [], []
    for i in range(len(images)):
        labelled = bool(batch["labelled"][i]) if "labelled" in batch else True
        tiles = [images[i], *((overlay(images[i], masks[i], palette), colour_mask(masks[i], palette)) if labelled
                              else (None, None))]  # an unlabelled entry's sample has no mask to show
        if styles is not None:
            tiles += list(styles[i])
        lines.append(tiles)
        labels.append(f"train: {meta['source'][i]}\ncase {meta['case'][i]}" if meta else "train")
    return lines, labels


def eval_rows(eval_sets: dict, rows: int, palette: np.ndarray) -> tuple[list[list[np.ndarray | None]], list[str]]:
    """``rows`` evenly spaced items of each evaluation split, whole (no augmentation)."""
    lines, labels = [], []
    for split, dataset in eval_sets.items():
        for index in np.linspace(0, len(dataset) - 1, min(rows, len(dataset))).round().astype(int):
            record = dataset.load(int(index))
            image = record.image[..., :3] if record.image.ndim == 3 else np.repeat(record.image[..., None], 3, -1)
            if record.mask is None:
                lines.append([image])
            else:
                lines.append([image, overlay(image, record.mask, palette), colour_mask(record.mask, palette)])
            h, w = record.image.shape[:2]
            labels.append(f"{split}: {dataset.name}\ncase {record.case}\n{w}x{h} px")
    return lines, labels


def small_images(records: list, patch_size: int) -> tuple[int, int, tuple[int, int] | None]:
    """How many of ``records`` are smaller than ``patch_size``, of how many, and the smallest (h, w)."""
    small, smallest = 0, None
    for record in records:
        h, w = record.image.shape[:2]
        if h < patch_size or w < patch_size:
            small += 1
            smallest = (h, w) if smallest is None or h * w < smallest[0] * smallest[1] else smallest
    return small, len(records), smallest


def class_frequencies(records: list) -> dict[int, float]:
    """Class id -> its share of the pixels of ``records``' masks."""
    counts: Counter = Counter()
    for record in records:
        if record.mask is not None:
            values, n = np.unique(record.mask, return_counts=True)
            counts.update(dict(zip(values.tolist(), n.tolist())))
    total = sum(counts.values())
    return {k: counts[k] / total for k in sorted(counts)} if total else {}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=demo style_sampling=augmented")
    parser.add_argument("--rows", type=int, default=6, help="training samples (default: %(default)s)")
    parser.add_argument("--eval-rows", type=int, default=2, help="samples per val/test split (0: none)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train_diff", overrides=args.overrides)
    torch.manual_seed(int(cfg.seed))
    source = instantiate(cfg.style_sampling.source)
    splits = ("val", "test") if args.eval_rows > 0 else ()
    dm = StedmDataModule(cfg.data, batch_size=args.rows, seed=int(cfg.seed), style_source=source, eval_splits=splits)
    names, patch = list(cfg.data.class_names), int(cfg.data.patch_size)
    print(f"data={cfg.data.name}  classes={names}  patch={patch}")
    mix = dm.epoch_mix()
    for name, dataset, ratio in zip(dm.names, dm.train_sets, dm.ratios):
        cases = len(set(dataset.cases()))
        kind = "labelled" if dataset.labelled else "unlabelled"
        print(f"  {name:<20} {kind:<10} items={len(dataset):<6} cases={cases:<5} ratio={ratio:<5g} "
              f"per epoch={mix[name]}")
        records = [dataset.load(i) for i in range(min(len(dataset), SURVEYED))]
        freqs = class_frequencies(records)
        if freqs:
            print("    class frequency: " + ", ".join(
                f"{names[k] if 0 <= k < len(names) else k}={v:.3f}" for k, v in freqs.items()))
        small, seen, smallest = small_images(records, patch)
        if small:
            warnings.warn(f"data.dataset.{name}: {small} of the first {seen} images are smaller than "
                          f"data.patch_size={patch} (smallest {smallest[1]}x{smallest[0]} px); training "
                          "mirror-pads them to the patch size, so the border pixels are reflections",
                          stacklevel=1)
    total = sum(mix.values())
    print(f"  epoch: {total} items = " + " + ".join(f"{100 * n / total:.0f}% {k}" for k, n in mix.items()))
    palette = class_palette(len(names))
    batch = next(iter(dm.train_dataloader()))
    rows, labels = sample_rows(batch, args.rows, palette)
    more, more_labels = eval_rows(dm.eval_sets, args.eval_rows, palette)
    columns = ["image", "overlay", "mask"] + [f"style {k + 1}" for k in range(max(len(r) for r in rows) - 3)]
    out = args.out or Path(cfg.location.result_dir) / "preview" / f"{cfg.data.name}.png"
    title = (f"data={cfg.data.name}: {len(rows)} training samples (augmented, style_sampling="
             f"{cfg.style_sampling.name}) and {len(more)} val/test samples; patch {patch} px")
    contact_sheet(rows + more, columns, labels + more_labels, names, out, title=title, tile=TILE)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
