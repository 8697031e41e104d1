"""The demo's stain simulation: labelled cases keep the scanner's stain, the unlabelled pool and
the test cases are re-stained (one test lab seen nowhere in training), masks stay those of the
unshifted image, the region split is unchanged, and all of it is seeded."""

from __future__ import annotations

import numpy as np

from stedm.data.datasets.demo import (HED_LIGHT, HED_STRONG, REGION, SCANNER, DemoDataset, demo_image_and_layout,
                             lab_stain, region_roles, region_stains, stained_region)
from stedm.metrics.stain import from_optical_density, mean_optical_density, optical_density


def raw_region(case: str) -> np.ndarray:
    image, _ = demo_image_and_layout()
    r, c = divmod(int(case.split("_")[1]), 4)
    return image[r * REGION:(r + 1) * REGION, c * REGION:(c + 1) * REGION]


def labs(dataset: DemoDataset) -> set[int]:
    return {dataset.load(i).meta["lab"] for i in range(len(dataset))}


def test_labelled_cases_keep_the_scanner_stain_and_the_others_are_restained():
    labelled, pool = DemoDataset("a", "labelled", "train"), DemoDataset("u", "unlabelled", "train")
    val, test = DemoDataset("a", split="val"), DemoDataset("a", split="test")
    for i in range(len(labelled)):
        record = labelled.load(i)
        np.testing.assert_array_equal(record.image, raw_region(record.case))
    assert labs(labelled) == {SCANNER} and labs(pool) == {1, 2} and labs(val) == {0, 1} and labs(test) == {1, 2, 3}
    assert 3 not in labs(labelled) | labs(pool)  # a test stain never seen in training
    for dataset in (pool, val, test):
        for i in range(len(dataset)):
            record = dataset.load(i)
            shift = np.abs(mean_optical_density(record.image) - mean_optical_density(raw_region(record.case)))
            assert shift.max() > 0.01, record.case  # every one of them is re-stained


def test_per_case_statistics_differ_as_specified():
    """Each case's stain is its lab's HED-strong draw times / plus its own HED-light draw."""
    stains = region_stains(4)
    for region, (lab, alpha, beta) in stains.items():
        lab_alpha, lab_beta = lab_stain(lab)
        if lab == SCANNER and region in region_roles()["pool"][:4]:
            assert (alpha == 1).all() and (beta == 0).all()
            continue
        assert np.all(np.abs(lab_alpha - 1) <= HED_STRONG) and np.all(np.abs(lab_beta) <= HED_STRONG)
        assert np.all(np.abs(alpha / lab_alpha - 1) <= HED_LIGHT) and np.all(np.abs(beta - lab_beta) <= HED_LIGHT)
    # two cases of one lab differ (case jitter), two labs differ more
    test = DemoDataset("a", split="test")
    stats = {test.load(i).meta["lab"]: mean_optical_density(test.load(i).image) for i in range(len(test))}
    assert len(stats) == 3 and len({tuple(np.round(v, 3)) for v in stats.values()}) == 3


def test_masks_come_from_the_unshifted_image_and_the_split_is_frozen():
    _, layout = demo_image_and_layout()
    assert region_roles(0) == {"test": [2, 3, 10, 11], "val": [0, 4], "pool": region_roles(0)["pool"]}
    for stains in (True, False):
        test = DemoDataset("a", split="test", stains=stains)
        for i in range(len(test)):
            record = test.load(i)
            r, c = divmod(int(record.case.split("_")[1]), 4)
            np.testing.assert_array_equal(record.mask, layout[r * REGION:(r + 1) * REGION, c * REGION:(c + 1) * REGION])
    plain = DemoDataset("a", split="test", stains=False).load(0)
    np.testing.assert_array_equal(plain.image, raw_region(plain.case))


def test_the_simulation_is_seeded_and_the_od_transform_inverts_exactly():
    again = DemoDataset("u", "unlabelled", "train")
    first = [again.load(i).image for i in range(len(again))]
    stained_region.cache_clear()  # computed afresh: the same pixels
    assert all(np.array_equal(a, DemoDataset("u", "unlabelled", "train").load(i).image) for i, a in enumerate(first))
    image = raw_region("region_05")
    np.testing.assert_array_equal(from_optical_density(optical_density(image)), image)
