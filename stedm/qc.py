"""Quality control of a pair folder: ``python -m stedm.qc SYN_DIR --segmenter RUN_DIR``.

``SYN_DIR`` is a folder ``predict_diff.py`` wrote (``img_*.png``, ``seg_*.png``, ``manifest.jsonl``,
``.stedm_settings.json``); ``RUN_DIR`` a ``train_seg.py`` run on REAL data (its
``resolved_config.yaml``; the weights come from its ``last.ckpt``, read weights-only). Writes
``SYN_DIR/qc/contact_sheet.png`` (image | mask | overlay | style source per pair, class legend)
and ``SYN_DIR/qc/report.json``, and prints the table:

- **layout fidelity**: IoU between each pair's layout and what the real-data segmenter segments
  in the synthetic image, averaged over the foreground classes (``..._iou_mean``, the name
  :mod:`stedm.metrics.segmentation` gives that mean), beside the same segmenter on the real test
  images (the ceiling). Both in one label space (binarised when the segmenter's and the layout's
  differ).
- **memorisation**: each synthetic image's distance (RMSE, 0-255, best of the 8 square symmetries
  and every window position) to its nearest labelled training image, beside the same for the
  real test images: a synthetic image far closer to a training image than unseen real images
  are is a copy, and a copied layout would inflate the fidelity.
- **style fidelity**: distance of the per-image mean H/E/DAB optical density
  (:mod:`stedm.metrics.stain`) between each synthetic image and its style source, against the
  distance to a random other real image of the style pool. Below 1 (ratio): style transfers.
- **KID** (x 1e3) of the synthetic images to real crops on the one offline extractor
  (:mod:`stedm.metrics.features`, NOT Inception), beside real training crops to the same crops.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from stedm.data.contract import IGNORE_INDEX, image_to_tensor
from stedm.data.pair_folder import read_pairs
from stedm.resume import LAST, run_checkpoint_dir

log = logging.getLogger(__name__)
QC_DIR = "qc"


# -- the segmenter ------------------------------------------------------------------------------
def load_segmenter(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[Any, DictConfig]:
    """The Segmenter of a ``train_seg.py`` run (rebuilt from its ``resolved_config.yaml``, weights
    from ``<result_dir>/checkpoints/<run_name>/last.ckpt`` or ``checkpoint``, weights-only) and
    the run's config."""
    from hydra.utils import instantiate

    from stedm.models.weights import load_safely
    from stedm.tasks.predict import check_targets

    run_dir = Path(run_dir)
    config = run_dir / "resolved_config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"--segmenter {run_dir}: no resolved_config.yaml there; give the run folder "
                                "train_seg.py wrote (results/.../runs/train_seg/<run_name>)")
    cfg = OmegaConf.load(config)
    if "model" not in cfg or "Segmenter" not in str(cfg.model.get("_target_", "")):
        raise ValueError(f"--segmenter {run_dir}: {config} is not a train_seg.py run (its model is "
                         f"{cfg.get('model', {}).get('_target_')})")
    check_targets(OmegaConf.to_container(cfg.model), (), config)
    path = Path(checkpoint) if checkpoint else run_checkpoint_dir(cfg) / LAST
    if not path.is_file():
        raise FileNotFoundError(f"--segmenter {run_dir}: no checkpoint at {path}; pass --checkpoint PATH")
    model = instantiate(cfg.model, lr=0.0, output_dir=None)
    state = load_safely(path, "--checkpoint", ".ckpt")
    model.load_state_dict(state["state_dict"] if "state_dict" in state else state)
    return model.eval(), cfg


@torch.no_grad()
def segment(model, image: np.ndarray) -> np.ndarray:
    """Class map H x W of a uint8 RGB image, by the model's own sliding window."""
    logits = model.test_evaluator.predict(model, image_to_tensor(image)[None].float())
    return logits[0].argmax(0).numpy()


def common_space(seg_classes: int, layout_classes: int) -> int:
    """The label space both are compared in: theirs if equal, else background vs foreground."""
    return seg_classes if seg_classes == layout_classes else 2


def to_space(mask: np.ndarray, classes: int) -> np.ndarray:
    return np.where((mask > 0) & (mask != IGNORE_INDEX), 1, mask) if classes == 2 else mask


class IoU:
    """Pooled per-class IoU over images; ``value`` is the mean over the foreground classes."""

    def __init__(self, classes: int) -> None:
        self.classes, self.inter, self.union = classes, np.zeros(classes), np.zeros(classes)

    def add(self, prediction: np.ndarray, target: np.ndarray) -> float:
        valid = target != IGNORE_INDEX
        p, t = prediction[valid], target[valid]
        inter = np.array([np.sum((p == c) & (t == c)) for c in range(self.classes)], dtype=float)
        union = np.array([np.sum((p == c) | (t == c)) for c in range(self.classes)], dtype=float)
        self.inter += inter
        self.union += union
        return _fg_mean(inter, union)

    @property
    def value(self) -> float:
        return _fg_mean(self.inter, self.union)


def _fg_mean(inter: np.ndarray, union: np.ndarray) -> float:
    present = union[1:] > 0
    return float(np.mean(inter[1:][present] / union[1:][present])) if present.any() else float("nan")


# -- memorisation -------------------------------------------------------------------------------
def _windows(image: np.ndarray, size: int, side: int) -> torch.Tensor:
    """Every ``size`` window (stride size/4) of an image, each resized to ``side`` px: N x 3*side^2."""
    x = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float()[None]
    if min(x.shape[-2:]) < size:
        x = torch.nn.functional.interpolate(x, size=(max(size, x.shape[-2]), max(size, x.shape[-1])), mode="bilinear")
    stride = max(1, size // 4)
    patches = x.unfold(2, size, stride).unfold(3, size, stride)  # 1 x 3 x nh x nw x size x size
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, size, size)
    return torch.nn.functional.interpolate(patches, size=(side, side), mode="area").flatten(1)


def nearest_distances(queries: list[np.ndarray], references: list[np.ndarray], side: int = 32) -> np.ndarray:
    """Per query image: RMSE (0-255) to its nearest window of any reference image, best of the 8
    square symmetries of the query (the training augmentation's orientations)."""
    out = []
    for query in queries:
        size = min(query.shape[:2])
        square = query[:size, :size]
        variants = [np.rot90(f, k) for f in (square, square[:, ::-1]) for k in range(4)]
        q = torch.cat([_windows(v, size, side) for v in variants])
        best = min(float(torch.cdist(q, _windows(ref, size, side)).min()) for ref in references)
        out.append(best / np.sqrt(3 * side * side))
    return np.array(out)


# -- style ---------------------------------------------------------------------------------------
def style_sources(settings: dict[str, Any], manifest: dict[int, dict]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Case -> image of every case of the style entries the manifest names (from the pair
    folder's settings), in entry order; the cases in a stable order."""
    from stedm.data.datamodule import build_dataset

    entries = sorted({str(r["style_source"]) for r in manifest.values() if "style_source" in r})
    if not entries or "data" not in settings:
        return {}, []
    data = OmegaConf.create({"dataset": settings["data"], "num_classes": settings.get("num_classes", 2)})
    images: dict[str, np.ndarray] = {}
    for entry in entries:
        if entry not in data.dataset:
            raise ValueError(f"the manifest names style entry '{entry}', which the folder's settings do not list")
        for split in ("train", "val", "test"):
            try:
                dataset = build_dataset(data, entry, split)
            except ValueError:
                continue
            for i in range(len(dataset)):
                record = dataset.load(i)
                images.setdefault(str(record.case), record.image)
    return images, sorted(images)


# -- KID -----------------------------------------------------------------------------------------
def random_crops(images: list[np.ndarray], size: int, per_image: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    crops = []
    for image in images:
        h, w = image.shape[:2]
        if min(h, w) < size:
            continue
        for _ in range(per_image):
            y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
            crops.append(image_to_tensor(np.ascontiguousarray(image[y:y + size, x:x + size, :3])))
    return torch.stack(crops) if crops else torch.empty(0, 3, size, size)


# -- the report ----------------------------------------------------------------------------------
def real_records(cfg: DictConfig, split: str, limit: int) -> list[Any]:
    from stedm.data.datamodule import build_dataset

    name = list(cfg.data.dataset.keys())[0]
    dataset = build_dataset(cfg.data, name, split)
    return [dataset.load(i) for i in range(min(len(dataset), limit))]


def run_qc(syn_dir: str | Path, segmenter: str | Path, checkpoint: str | Path | None = None,
           out: str | Path | None = None, max_pairs: int = 256, max_real: int = 64, sheet_pairs: int = 12,
           seed: int = 0) -> dict[str, Any]:
    """Everything the module docstring lists; returns the report (also written as JSON)."""
    from stedm.metrics.features import distances, feature_extractor
    from stedm.metrics.stain import mean_optical_density
    from stedm.viz import pair_folder_sheet

    syn_dir = Path(syn_dir)
    pairs = read_pairs(syn_dir, max_pairs)
    settings, manifest, indices = pairs.settings, pairs.manifest, pairs.indices
    if not indices:
        raise ValueError(f"SYN_DIR {syn_dir}: no img_XXXXX.png/seg_XXXXX.png pairs")
    model, cfg = load_segmenter(segmenter, checkpoint)
    seg_classes = int(model.hparams.num_classes)
    images, masks, layout_classes = pairs.images, pairs.masks, pairs.layout_classes
    space = common_space(seg_classes, layout_classes)

    # layout fidelity and its ceiling
    fidelity, per_pair = IoU(space), {}
    for i in indices:
        per_pair[i] = {"iou_mean": fidelity.add(to_space(segment(model, images[i]), space), to_space(masks[i], space))}
    test = real_records(cfg, "test", max_real)
    ceiling = IoU(space)
    for record in test:
        ceiling.add(to_space(segment(model, record.image), space), to_space(record.mask, space))

    # memorisation
    train = [r.image for r in real_records(cfg, "train", max_real)]
    syn_near = nearest_distances([images[i] for i in indices], train)
    patch = min(min(im.shape[:2]) for im in images.values())
    test_near = nearest_distances([r.image[:patch, :patch] for r in test if min(r.image.shape[:2]) >= patch], train)
    for i, d in zip(indices, syn_near):
        per_pair[i]["nearest_train_rmse"] = float(d)

    # style fidelity
    sources, cases = style_sources(settings, manifest)
    rng = np.random.default_rng(seed)
    to_source, to_random, style_images = [], [], {}
    source_od = {case: mean_optical_density(image) for case, image in sources.items()}
    for i in indices:
        case = str(manifest.get(i, {}).get("style_case", ""))
        if case not in sources:
            continue
        style_images[i] = sources[case]
        stats = mean_optical_density(images[i])
        d_source = float(np.linalg.norm(stats - source_od[case]))
        others = [c for c in cases if c != case]
        per_pair[i]["style_od_distance"] = d_source
        to_source.append(d_source)
        if others:
            other = others[int(rng.integers(len(others)))]
            to_random.append(float(np.linalg.norm(stats - source_od[other])))

    # KID on the one offline extractor
    real_pool = [r.image for r in test] + [sources[c] for c in cases]
    real_crops = random_crops(real_pool, patch, 4, seed)
    fake = torch.stack([image_to_tensor(images[i][:patch, :patch]) for i in indices])
    train_crops = random_crops(train, patch, max(1, len(indices) // max(1, len(train))), seed + 1)
    kid = kid_ref = None
    if len(real_crops) >= 2 and len(fake) >= 2:
        extractor = feature_extractor()
        kid = distances(real_crops, fake, extractor)[0]
        if len(train_crops) >= 2:
            kid_ref = distances(real_crops, train_crops, extractor)[0]

    report = {
        "pair_folder": str(syn_dir), "segmenter": str(segmenter), "pairs": len(indices),
        "label_space": {"layout_classes": layout_classes, "segmenter_classes": seg_classes, "compared_in": space},
        "layout_fidelity_iou_mean": fidelity.value, "ceiling_real_test_iou_mean": ceiling.value,
        "real_test_images": len(test),
        "nearest_train_rmse_synthetic": _summary(syn_near), "nearest_train_rmse_real_test": _summary(test_near),
        "style_od_distance_to_source": _summary(np.array(to_source)),
        "style_od_distance_to_random_real": _summary(np.array(to_random)),
        "style_ratio": (float(np.mean(to_source) / np.mean(to_random)) if to_source and to_random
                        and np.mean(to_random) > 0 else None),
        "kid_x1e3_synthetic_vs_real": kid, "kid_x1e3_real_train_vs_real": kid_ref,
        "feature_extractor": "seeded random ResNet-18 (stedm.metrics.features), not Inception",
        "per_pair": {str(i): v for i, v in per_pair.items()},
    }
    out = syn_dir / QC_DIR if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = {i: f"IoU {v['iou_mean']:.2f}" + (f" dOD {v['style_od_distance']:.2f}" if "style_od_distance" in v else "")
             for i, v in per_pair.items()}
    report["contact_sheet"] = str(pair_folder_sheet(pairs, out / "contact_sheet.png", limit=sheet_pairs,
                                                    style_images=style_images or None, notes=notes))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    report["report"] = str(out / "report.json")
    return report


def _summary(values: np.ndarray) -> dict[str, float] | None:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return None
    return {"mean": float(values.mean()), "median": float(np.median(values)), "min": float(values.min()),
            "max": float(values.max()), "n": int(values.size)}


def table(report: dict[str, Any]) -> str:
    def mean(key: str) -> str:
        value = report.get(key)
        return "-" if value is None else f"{value['mean']:.3f} (median {value['median']:.3f}, n={value['n']})"

    def num(value: float | None, fmt: str = ".3f") -> str:
        return "-" if value is None else format(value, fmt)

    space = report["label_space"]
    rows = [
        ("pairs", str(report["pairs"])),
        ("label space", f"layout {space['layout_classes']} classes, segmenter {space['segmenter_classes']}, "
                        f"compared in {space['compared_in']}"),
        ("layout fidelity: fg-class mean IoU, synthetic", num(report["layout_fidelity_iou_mean"])),
        ("ceiling: same segmenter, real test", f"{num(report['ceiling_real_test_iou_mean'])} "
                                               f"({report['real_test_images']} images)"),
        ("nearest training image RMSE: synthetic", mean("nearest_train_rmse_synthetic")),
        ("nearest training image RMSE: real test", mean("nearest_train_rmse_real_test")),
        ("style: mean-OD distance to style source", mean("style_od_distance_to_source")),
        ("style: mean-OD distance to random real", mean("style_od_distance_to_random_real")),
        ("style ratio (source / random; < 1 = transfer)", num(report["style_ratio"])),
        ("KID x1e3 synthetic vs real (ResNet-18 rnd)", num(report["kid_x1e3_synthetic_vs_real"], ".2f")),
        ("KID x1e3 real train vs real (reference)", num(report["kid_x1e3_real_train_vs_real"], ".2f")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stedm.qc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("syn_dir", type=Path, help="a pair folder written by predict_diff.py")
    parser.add_argument("--segmenter", required=True, type=Path, help="a train_seg.py run folder (real data)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="instead of the run's last.ckpt")
    parser.add_argument("--out", type=Path, default=None, help="default SYN_DIR/qc")
    parser.add_argument("--max-pairs", type=int, default=256)
    parser.add_argument("--max-real", type=int, default=64, help="real test / training images used at most")
    parser.add_argument("--sheet-pairs", type=int, default=12, help="pairs on the contact sheet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    report = run_qc(args.syn_dir, args.segmenter, args.checkpoint, args.out, args.max_pairs, args.max_real,
                    args.sheet_pairs, args.seed)
    print(table(report))
    print(f"report: {report['report']}\ncontact sheet: {report['contact_sheet']}")
    return report


if __name__ == "__main__":
    main()
