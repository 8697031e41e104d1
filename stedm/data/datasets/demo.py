"""The embedded demo data: real IHC tissue that ships inside scikit-image (no download).

``skimage.data.immunohistochemistry()`` is a 512 x 512 IHC image (hematoxylin counterstain,
DAB-positive cells). We cut it into a 4 x 4 grid of 128-px regions; each region is one case
(patient stand-in), so per-case statistics exist. A seeded permutation assigns regions to
test (4), validation (2) and a training pool (10); the first ``class_train_samples`` regions
of the pool are labelled, the rest form the unlabelled style / pretraining pool. Regions never
overlap between roles.

The masks are DERIVED, not expert annotations: colour deconvolution (``rgb2hed``), Gaussian
smoothing and Otsu thresholds give 0 = background, 1 = hematoxylin (nuclei), 2 = DAB-positive.
Figures obtained on the demo data are illustrative only.

**Stain simulation** (so that style matters): every case is re-stained as if it came from one
of four labs, in HED optical-density space (:mod:`stedm.metrics.stain`), with the HED
perturbation of Tellez et al. (2018), "Whole-slide mitosis detection in H&E breast histology
using PHH3 as a reference to train distilled stain-invariant convolutional networks", IEEE TMI
37(9): each stain channel ``s -> alpha * s + beta`` with ``alpha ~ U(1 - sigma, 1 + sigma)`` and
``beta ~ U(-sigma, sigma)`` per channel; strengths as Tellez et al. (2019), "Quantifying the
effects of data augmentation and stain color normalization in convolutional neural networks for
computational pathology", Medical Image Analysis 58, name them: "HED-light" sigma = 0.05,
"HED-strong" sigma = 0.2. A lab's stain is one HED-strong draw (seed ``STAIN_SEED``); each case
of a lab adds its own HED-light draw (the case-to-case variation within a lab). Fixed here:

- lab 0, the scanner's stain = the image as shipped: every LABELLED training case, unchanged;
- labs 1 and 2: the UNLABELLED pool (alternating, in the pool's seeded order);
- validation: one case of lab 0 and one of lab 1;
- test: labs 1, 2, 3, 3 (lab 3 appears in neither labelled nor unlabelled training data).

Masks are derived from the UNSHIFTED image, so a stain never moves a label; the 4 x 4 split of
regions into roles is the same as without stains. ``stains=false`` turns the simulation off.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from stedm.data.base import Record, SegmentationDataset, check_role
from stedm.metrics.stain import hed_draw, hed_perturb

GRID = 4
REGION = 128
N_TEST, N_VAL = 4, 2
CLASS_NAMES = ("background", "hematoxylin", "dab")
HED_LIGHT, HED_STRONG = 0.05, 0.2  # Tellez et al. 2019's "HED-light" / "HED-strong" sigma
STAIN_SEED = 2018
SCANNER, UNLABELLED_LABS, VAL_LABS, TEST_LABS = 0, (1, 2), (0, 1), (1, 2, 3, 3)


@lru_cache(maxsize=1)
def demo_image_and_layout() -> tuple[np.ndarray, np.ndarray]:
    """The IHC image and its derived 3-class layout (computed once per process)."""
    from scipy.ndimage import gaussian_filter
    from skimage import data
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    image = data.immunohistochemistry()
    hed = rgb2hed(image)
    hema = gaussian_filter(hed[..., 0], sigma=1.5)
    dab = gaussian_filter(hed[..., 2], sigma=1.5)
    layout = np.zeros(image.shape[:2], dtype=np.uint8)
    layout[hema > threshold_otsu(hema)] = 1
    layout[dab > threshold_otsu(dab)] = 2
    return image, layout


def region_roles(seed: int = 0) -> dict[str, list[int]]:
    """Region ids (row-major in the 4 x 4 grid) of each role; deterministic in ``seed``."""
    order = np.random.default_rng(seed).permutation(GRID * GRID).tolist()
    return {
        "test": sorted(order[:N_TEST]),
        "val": sorted(order[N_TEST:N_TEST + N_VAL]),
        "pool": order[N_TEST + N_VAL:],  # kept in seeded order: labelled = its first k
    }


def lab_stain(lab: int) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, beta)`` of lab ``lab`` (0 = the scanner's stain: identity)."""
    if lab == SCANNER:
        return np.ones(3), np.zeros(3)
    return hed_draw(np.random.default_rng([STAIN_SEED, lab]), HED_STRONG)


@lru_cache(maxsize=64)  # read on every load: computed once per (k, seed); callers only read it
def region_stains(k: int, seed: int = 0) -> dict[int, tuple[int, np.ndarray, np.ndarray]]:
    """Region -> ``(lab, alpha, beta)`` with ``k`` labelled training regions (see the module
    docstring for which role gets which lab). Labelled regions get the identity exactly."""
    roles = region_roles(seed)
    labs = {r: SCANNER for r in roles["pool"][:k]}
    labs.update({r: UNLABELLED_LABS[i % len(UNLABELLED_LABS)] for i, r in enumerate(roles["pool"][k:])})
    labs.update(dict(zip(roles["val"], VAL_LABS)))
    labs.update(dict(zip(roles["test"], TEST_LABS)))
    stains = {}
    for region, lab in labs.items():
        alpha, beta = lab_stain(lab)
        if region not in roles["pool"][:k]:
            light_alpha, light_beta = hed_draw(np.random.default_rng([STAIN_SEED, 100 + region]), HED_LIGHT)
            alpha, beta = alpha * light_alpha, beta + light_beta
        stains[region] = (lab, alpha, beta)
    return stains


@lru_cache(maxsize=64)
def stained_region(region: int, k: int, seed: int) -> np.ndarray:
    """The region's image in its case's stain (the scanner's stain: the image unchanged)."""
    image, _ = demo_image_and_layout()
    r, c = divmod(region, GRID)
    window = image[r * REGION:(r + 1) * REGION, c * REGION:(c + 1) * REGION]
    lab, alpha, beta = region_stains(k, seed)[region]
    out = window.copy() if lab == SCANNER and region in region_roles(seed)["pool"][:k] else \
        hed_perturb(window, alpha, beta)
    out.flags.writeable = False
    return out


class DemoDataset(SegmentationDataset):
    """Regions of the embedded IHC image.

    ``role="labelled"``: the split's regions with masks (train: the first
    ``class_train_samples`` of the pool). ``role="unlabelled"``: the rest of the training pool,
    without masks (for every split: unlabelled data has no val/test).
    """

    def __init__(self, name: str, role: str = "labelled", split: str = "train",
                 class_train_samples: int | None = 4, seed: int = 0, stains: bool = True, **kwargs) -> None:
        super().__init__(name=name, split=split, **kwargs)
        self.role = check_role(role, f"dataset '{name}'")
        roles = region_roles(seed)
        pool = roles["pool"]
        k = len(pool) if class_train_samples is None else int(class_train_samples)
        if not 0 < k <= len(pool):
            raise ValueError(f"dataset '{name}': data.class_train_samples={class_train_samples} must be "
                             f"between 1 and {len(pool)} (training regions of the demo image)")
        self.k, self.seed, self.stains = k, int(seed), bool(stains)
        if role == "unlabelled":
            self.regions = sorted(pool[k:])
        elif split == "train":
            self.regions = sorted(pool[:k])
        else:
            self.regions = roles[split]

    @property
    def labelled(self) -> bool:
        return self.role == "labelled"

    def __len__(self) -> int:
        return len(self.regions)

    def load(self, index: int) -> Record:
        image, layout = demo_image_and_layout()
        region = self.regions[index]
        r, c = divmod(region, GRID)
        window = np.s_[r * REGION:(r + 1) * REGION, c * REGION:(c + 1) * REGION]
        mask = layout[window] if self.labelled else None  # from the unshifted image
        pixels = stained_region(region, self.k, self.seed).copy() if self.stains else image[window].copy()
        meta = {"lab": region_stains(self.k, self.seed)[region][0] if self.stains else SCANNER}
        return Record(image=pixels, mask=None if mask is None else mask.copy(),
                      case=f"region_{region:02d}", meta=meta)

    def cases(self) -> list[str]:
        return [f"region_{region:02d}" for region in self.regions]
