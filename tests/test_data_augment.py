"""The seeded training augmentation: every orientation of its group equally often, steps independent."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from stedm.data.base import Record, SegmentationDataset
from stedm.data.datamodule import SeededItems
from stedm.data.datasets.demo import HED_STRONG, STAIN_SEED, demo_image_and_layout
from stedm.data.transforms import seed_transform, train_transform
from stedm.metrics.stain import hed_draw

SIZE = 6
PATTERN = np.arange(1, SIZE * SIZE + 1, dtype=np.int64).reshape(SIZE, SIZE)  # every pixel its own id


def orientations(a: np.ndarray) -> dict[str, np.ndarray]:
    """The 8 symmetries of the square applied to ``a`` (rotations r*, mirrors m*)."""
    out = {f"r{90 * k}": np.rot90(a, k) for k in range(4)}
    out.update({f"m{90 * k}": np.rot90(np.fliplr(a), k) for k in range(4)})
    return out


def orientation_of(result: np.ndarray, original: np.ndarray = PATTERN) -> str:
    matches = [name for name, candidate in orientations(original).items() if np.array_equal(result, candidate)]
    assert len(matches) == 1, "the patch is not a rotation or mirror image of the input"
    return matches[0]


class Pattern(SegmentationDataset):
    """One image whose pixels are all different, with the same pattern as mask and instance map."""

    def __len__(self) -> int:
        return 1

    def load(self, index: int) -> Record:
        image = np.stack([PATTERN * 7 % 256] * 3, axis=-1).astype(np.uint8)
        return Record(image=image, mask=PATTERN % 2, case="pattern", instances=PATTERN)


def draw(seeds, **augment) -> list[dict]:
    items = SeededItems(Pattern("pattern", transform=train_transform(SIZE, **augment)))
    return [items[(0, seed)] for seed in seeds]


@pytest.mark.parametrize("augment, group", [
    ({"flips": True, "rotate90": True}, ["r0", "r90", "r180", "r270", "m0", "m90", "m180", "m270"]),
    ({"flips": True, "rotate90": False}, ["r0", "m0", "m180", "r180"]),  # identity, flips H, V, both
    ({"flips": False, "rotate90": True}, ["r0", "r90", "r180", "r270"]),
])
def test_each_orientation_of_the_group_is_equally_likely(augment, group):
    n = 100 * len(group)
    counts = Counter()
    for sample in draw(range(n), **augment):
        orientation = orientation_of(sample["instances"].numpy())
        # image, mask and instances turn together
        image_ids = np.rint((sample["image"][0].numpy() + 1) * 127.5).astype(np.int64)
        assert np.array_equal(image_ids, orientations(PATTERN * 7 % 256)[orientation])
        assert np.array_equal(sample["mask"].numpy(), orientations(PATTERN % 2)[orientation])
        counts[orientation] += 1
    assert set(counts) == set(group)
    # 100 expected each; binomial sd <= 10, so +-35 is a > 3.5 sd bound
    assert all(abs(c - 100) <= 35 for c in counts.values()), counts
    chi2 = sum((c - 100) ** 2 / 100 for c in counts.values())
    assert chi2 < 25, counts  # df <= 7: p < 0.001


def test_no_augmentation_keeps_the_orientation():
    assert {orientation_of(s["instances"].numpy()) for s in draw(range(20), flips=False, rotate90=False)} == {"r0"}


def test_same_seed_same_orientation():
    first = [orientation_of(s["instances"].numpy()) for s in draw(range(30))]
    again = [orientation_of(s["instances"].numpy()) for s in draw(range(30))]
    assert first == again and len(set(first)) > 4


def test_random_steps_of_the_pipeline_are_independent():
    """Crop position, orientation, colour jitter and blur are drawn independently of each other
    and of ``np.random.default_rng(seed)`` (the style source's generator for the same sample)."""
    transform = train_transform(8, color_jitter=0.5, blur=0.5)
    transform.save_applied_params = True
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    rows = []
    elements = ["e", "r90", "r180", "r270", "v", "hvt", "h", "t"]
    for seed in range(800):
        seed_transform(transform, seed)
        applied = dict(transform(image=image)["applied_transforms"])
        x0, y0 = applied["RandomCrop"]["crop_coords"][:2]
        rows.append((x0, y0, elements.index(str(applied["SquareSymmetry"]["group_element"])),
                     "ColorJitter" in applied, "GaussianBlur" in applied,
                     int(np.random.default_rng(seed).integers(8))))
    x0, y0, element, jitter, blur, style_draw = (np.asarray(c, dtype=np.float64) for c in zip(*rows))
    assert 0.4 < jitter.mean() < 0.6 and 0.4 < blur.mean() < 0.6
    assert 0.18 < (jitter * blur).mean() < 0.32  # fire together only a quarter of the time
    mirrored = (element >= 4).astype(np.float64)
    for a, b in ((x0, y0), (x0, mirrored), (y0, mirrored), (x0, jitter), (y0, blur), (mirrored, jitter),
                 (element, style_draw)):
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.15  # independent: |r| ~ 0.035 sd over 800 draws
    assert (element == style_draw).mean() < 0.2  # 1/8 when independent


def test_seeded_getitem_is_reproducible_and_leaves_the_global_generator_alone():
    state = torch.random.get_rng_state()
    a, b = draw([5, 5])
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["instances"], b["instances"])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_hed_draws_and_the_seeded_hed_jitter_give_the_numbers_they_gave_before_the_draw_moved():
    # Pinned from stedm.data.datasets.demo's draw before it moved to stedm.metrics.stain.hed_draw.
    alpha, beta = hed_draw(np.random.default_rng([STAIN_SEED, 1]), HED_STRONG)  # the demo's lab 1
    assert np.r_[alpha, beta].tolist() == [0.8392688657068796, 0.9949207961847623, 1.1924887295385622,
                                           0.11249091033804676, -0.019466944615060544, 0.1555177274291688]
    jitter = train_transform(64, hed_jitter=HED_STRONG)
    seed_transform(jitter, 7)
    image, layout = demo_image_and_layout()
    assert int(jitter(image=image[:200, :200], mask=layout[:200, :200])["image"].astype(np.int64).sum()) == 1294738
