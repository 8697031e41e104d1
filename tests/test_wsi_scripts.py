"""The entry scripts run on whole-slide fixture data in the documented her2/catch layouts."""

from __future__ import annotations

import json
from pathlib import Path

from stedm.tasks.diffusion import train_diffusion
from stedm.tasks.segmentation import train_segmentation
from wsi_fixtures import rectangle, tissue_image, write_catch, write_wsi_folder

SMALL = ["preset=tiny", "data.patch_size=32", "data.downsample=2", "data.annotation_downsample=8",
         "data.tissue.downsample=8", "data.samples=8", "data.eval_overlap=8", "data.border_crop=4",
         "trainer.enable_progress_bar=false"]


def test_train_diff_on_catch_with_multi_patch_style(compose_cfg, tmp_path):
    write_catch(tmp_path / "data" / "catch")
    cfg = compose_cfg("train_diff", ["data=catch", "style_sampling=mp", *SMALL, "trainer.max_steps=2",
                                     "diffusion.sample_every_n_steps=0"])
    train_diffusion(cfg)
    assert (Path(cfg.location.result_dir) / "checkpoints" / cfg.run_name / "last.ckpt").is_file()


def test_train_seg_on_her2_geojson_slides(compose_cfg, tmp_path):
    image = tissue_image(256, 256, [(32, 32, 224, 224)])
    features = [("Hard Negative", [rectangle(32, 32, 224, 224)]), ("HER2 3+", [rectangle(96, 96, 160, 160)])]
    rows = ["s0.tif,p0,train,3", "s1.tif,p1,train,2", "s2.tif,p2,val,3", "s3.tif,p3,test,3", "s4.tif,p4,test,2"]
    write_wsi_folder(tmp_path / "data" / "her2", {f"s{i}": (image, features) for i in range(5)}, rows,
                     header="slide,case,split,score")
    cfg = compose_cfg("train_seg", ["data=her2", *SMALL, "trainer.max_epochs=1", "test_checkpoints=[last]"])
    train_segmentation(cfg)
    run = Path(cfg.location.result_dir) / "runs" / "train_seg" / cfg.run_name
    metrics = json.loads((run / "metrics_last.json").read_text())
    assert metrics["n_cases"] == 2  # one case per test slide
    assert "subtype_recall_fg_var" in metrics  # HER2 scores act as subtypes
