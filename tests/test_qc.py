"""``python -m stedm.qc``: on a pair folder whose images ARE the real test images the layout
fidelity equals the real-test ceiling and the style distance is 0; on noise the fidelity is
low; the contact sheet and the report are written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from stedm.data.datamodule import build_dataset
from stedm.data.pair_folder import SETTINGS
from stedm.data.transforms import train_transform
from stedm.qc import main, run_qc
from stedm.viz import class_palette

from conftest import compose_in


@pytest.fixture(scope="module")
def segmenter_run(tmp_path_factory):
    """A train_seg-style run folder of a tiny segmenter trained briefly on the demo's real data."""
    root = tmp_path_factory.mktemp("qc")
    cfg = compose_in(root, "train_seg", ["preset=tiny", "location.precision=32-true"])
    run = root / "results" / "runs" / "train_seg" / cfg.run_name
    run.mkdir(parents=True)
    (run / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = instantiate(cfg.model, lr=0.0, output_dir=None)
    data = build_dataset(cfg.data, "demo_anno", "train", train_transform(64, flips=True, rotate90=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = [data[(8 * step + j) % len(data)] for j in range(8)]
        loss = model.loss(model.net(torch.stack([b["image"] for b in batch])), torch.stack([b["mask"] for b in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    checkpoints = root / "results" / "checkpoints" / cfg.run_name
    checkpoints.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict()}, checkpoints / "last.ckpt")
    return root, run, cfg


def pair_folder(root, cfg, kind: str):
    """The real test regions (or noise) as pairs, each image its own style source."""
    test = build_dataset(cfg.data, "demo_anno", "test")
    folder = root / f"pairs_{kind}"
    folder.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(len(test)):
        record = test.load(i)
        image = record.image if kind == "real" else rng.integers(0, 256, record.image.shape, dtype=np.uint8)
        Image.fromarray(image).save(folder / f"img_{i:05d}.png")
        Image.fromarray(record.mask).save(folder / f"seg_{i:05d}.png")
        records.append({"index": i, "layout_case": record.case, "style_case": record.case, "style_source": "demo_anno"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / SETTINGS).write_text(json.dumps({
        "data": OmegaConf.to_container(cfg.data.dataset, resolve=True), "num_classes": 3, "layout_classes": 3,
        "class_names": list(cfg.data.class_names)}))
    return folder


def test_real_images_as_pairs_reach_the_ceiling_with_zero_style_distance(segmenter_run, capsys):
    root, run, cfg = segmenter_run
    folder = pair_folder(root, cfg, "real")
    report = main([str(folder), "--segmenter", str(run)])
    assert report["layout_fidelity_iou_mean"] == pytest.approx(report["ceiling_real_test_iou_mean"], abs=1e-9)
    assert report["ceiling_real_test_iou_mean"] > 0.3  # the segmenter learnt something
    assert report["style_od_distance_to_source"]["max"] == pytest.approx(0.0, abs=1e-9)
    assert report["style_od_distance_to_random_real"]["mean"] > 0.05 and report["style_ratio"] < 0.01
    assert report["nearest_train_rmse_synthetic"]["mean"] == pytest.approx(report["nearest_train_rmse_real_test"]["mean"])
    assert report["kid_x1e3_synthetic_vs_real"] is not None
    printed = capsys.readouterr().out
    assert "layout fidelity" in printed and "ceiling" in printed and "style ratio" in printed
    assert json.loads((folder / "qc" / "report.json").read_text())["pairs"] == 4
    # the contact sheet: 4 columns (image, mask, overlay, style source) and the legend in the class palette
    sheet = np.asarray(Image.open(folder / "qc" / "contact_sheet.png").convert("RGB"))
    assert sheet.shape[0] > 4 * 160 and sheet.shape[1] > 4 * 160
    for colour in class_palette(3)[1:]:
        assert (sheet == colour).all(axis=-1).sum() > 100  # masks and legend swatches are drawn in it


def test_noise_as_pairs_has_low_layout_fidelity(segmenter_run):
    root, run, cfg = segmenter_run
    report = run_qc(pair_folder(root, cfg, "noise"), run)
    assert report["layout_fidelity_iou_mean"] < 0.5 * report["ceiling_real_test_iou_mean"]
    assert report["kid_x1e3_synthetic_vs_real"] > 10 * max(report["kid_x1e3_real_train_vs_real"], 1.0)
    assert report["style_ratio"] > 0.5  # noise does not carry its style source's stain


def test_a_run_folder_without_its_config_is_refused_by_name(tmp_path):
    (tmp_path / "pairs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "pairs" / "img_00000.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "pairs" / "seg_00000.png")
    with pytest.raises(FileNotFoundError, match="--segmenter .*resolved_config.yaml"):
        run_qc(tmp_path / "pairs", tmp_path / "nowhere")
