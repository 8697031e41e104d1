"""``python -m stedm.data.preview``: a contact sheet a person can read, of training and val/test samples."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import write_folder_dataset
from stedm.data.preview import TILE, main
from stedm.viz import class_palette


def test_preview_shows_training_and_eval_samples_with_legend(tmp_path, capsys):
    out = tmp_path / "preview.png"
    main(["data=demo", "data/dataset=[demo_anno,demo_unanno]", f"location.result_dir={tmp_path}",
          "--rows", "2", "--eval-rows", "1", "--out", str(out)])
    sheet = np.asarray(Image.open(out).convert("RGB"))
    # 2 training + 1 val + 1 test rows of TILE px (patches of 64 px are enlarged), 4 columns
    assert sheet.shape[0] > 4 * TILE and sheet.shape[1] > 4 * TILE
    colours = {tuple(c) for c in sheet.reshape(-1, 3)[:: 7]}
    assert all(tuple(int(v) for v in c) in colours for c in class_palette(3)[1:])  # masks and legend in the palette
    assert f"wrote {out}" in capsys.readouterr().out


def test_preview_warns_when_images_are_smaller_than_the_patch(tmp_path):
    write_folder_dataset(tmp_path / "data" / "folder", n=8, size=40)
    common = ["data=folder", f"location.data_dir={tmp_path / 'data'}", f"location.result_dir={tmp_path}",
              "--rows", "2", "--eval-rows", "0"]
    with pytest.warns(UserWarning, match=r"data.dataset.folder_anno: 5 of the first 5 images are smaller than "
                                         r"data.patch_size=48 \(smallest 40x40 px\).*mirror-pads"):
        main([*common, "data.patch_size=48", "--out", str(tmp_path / "small.png")])
    assert (tmp_path / "small.png").is_file()
