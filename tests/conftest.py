"""Shared fixtures: compose the real configs and write tiny datasets in their real formats."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny shapes run fastest on one thread, and several threads oversubscribe a shared 2-core
# machine badly (subprocesses started by tests inherit this too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import stedm  # noqa: F401  (registers the config resolvers)
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


#: ``STEDM_TEST_PRECISION=32-true|bf16-mixed|...`` forces ``location.precision`` in the tests
#: marked ``e2e`` (their composed configs and the scripts they start), after the test's own
#: overrides: a comparison then runs at that precision on both sides.
PRECISION_ENV = "STEDM_TEST_PRECISION"
_forced_precision: str | None = None


def forced_precision() -> list[str]:
    """``["location.precision=<forced>"]`` inside an e2e test run with ``STEDM_TEST_PRECISION``, else ``[]``."""
    return [f"location.precision={_forced_precision}"] if _forced_precision else []


@pytest.fixture(autouse=True)
def _force_e2e_precision(request):
    global _forced_precision
    value = os.environ.get(PRECISION_ENV, "").strip()
    _forced_precision = value if value and request.node.get_closest_marker("e2e") else None
    yield
    _forced_precision = None


def compose_in(root: Path, config_name: str, overrides: list[str] | None = None):
    """The composed config ``config_name`` with data and results under ``root``."""
    base = [f"location.data_dir={root / 'data'}", f"location.result_dir={root / 'results'}"]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=base + list(overrides or []) + forced_precision())


@pytest.fixture
def compose_cfg(tmp_path):
    """``compose_cfg(name, overrides)`` -> the composed config, writing under ``tmp_path``."""
    return lambda config_name, overrides=None: compose_in(tmp_path, config_name, overrides)


def write_folder_dataset(root: Path, n: int = 6, size: int = 40, num_classes: int = 2,
                         palette: dict | None = None, csv_rows: list[str] | None = None) -> Path:
    """Images + masks in the `folder` layout; mask class = pattern known from the index."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[: size // 2, : (i % 3 + 1) * 4] = (i % (num_classes - 1)) + 1
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        if palette:
            Image.fromarray(np.asarray([palette[int(v)] for v in mask.ravel()], np.uint8).reshape(size, size, 3)
                            ).save(root / "masks" / f"img{i}.png")
        else:
            Image.fromarray(mask).save(root / "masks" / f"img{i}.png")
    if csv_rows is not None:
        (root / "cases.csv").write_text("\n".join(["image,case,split", *csv_rows]) + "\n")
    return root


def write_synthetic_pairs(folder: Path, n: int = 3, size: int = 32, manifest: bool = True) -> Path:
    import json

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    records = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i:05d}.png")
        mask = np.zeros((size, size), np.uint8)
        mask[i:, :] = 1
        Image.fromarray(mask).save(folder / f"seg_{i:05d}.png")
        records.append({"index": i, "layout_case": f"L{i}", "style_case": f"S{i}"})
    if manifest:
        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def write_flowers(root: Path, classes: list[int], per_class: int = 4, size: int = 32) -> dict:
    """Oxford-102 layout: imgs/, segs/ (blue background), imagelabels.mat, setid.mat.

    Image ids run class by class; in each class the first half are trnid, then one valid,
    the rest tstid. Returns the id lists.
    """
    from scipy.io import savemat

    (root / "imgs").mkdir(parents=True)
    (root / "segs").mkdir()
    labels, trnid, valid, tstid = [], [], [], []
    rng = np.random.default_rng(2)
    image_id = 0
    for c in classes:
        for j in range(per_class):
            image_id += 1
            labels.append(c + 1)  # 1-based in the .mat
            (trnid if j < per_class // 2 else valid if j == per_class // 2 else tstid).append(image_id)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                root / "imgs" / f"image_{image_id:05d}.jpg", quality=95)
            seg = np.zeros((size, size, 3), np.uint8)
            seg[..., 2] = 254  # pure blue background
            seg[:16, 16 * (j % 2):16 * (j % 2) + 16] = (200, 30, 60)  # flower: one 16-px JPEG block
            Image.fromarray(seg).save(root / "segs" / f"segmim_{image_id:05d}.jpg", quality=100, subsampling=0)
    savemat(root / "imagelabels.mat", {"labels": np.array([labels])})
    savemat(root / "setid.mat", {"trnid": np.array([trnid]), "valid": np.array([valid]), "tstid": np.array([tstid])})
    return {"trnid": trnid, "valid": valid, "tstid": tstid, "labels": labels}
