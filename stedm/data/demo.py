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
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from stedm.data.base import Record, SegmentationDataset, check_role

GRID = 4
REGION = 128
N_TEST, N_VAL = 4, 2
CLASS_NAMES = ("background", "hematoxylin", "dab")


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


class DemoDataset(SegmentationDataset):
    """Regions of the embedded IHC image.

    ``role="labelled"``: the split's regions with masks (train: the first
    ``class_train_samples`` of the pool). ``role="unlabelled"``: the rest of the training pool,
    without masks (for every split: unlabelled data has no val/test).
    """

    def __init__(self, name: str, role: str = "labelled", split: str = "train",
                 class_train_samples: int | None = 4, seed: int = 0, **kwargs) -> None:
        super().__init__(name=name, split=split, **kwargs)
        self.role = check_role(role, f"dataset '{name}'")
        roles = region_roles(seed)
        pool = roles["pool"]
        k = len(pool) if class_train_samples is None else int(class_train_samples)
        if not 0 < k <= len(pool):
            raise ValueError(f"dataset '{name}': data.class_train_samples={class_train_samples} must be "
                             f"between 1 and {len(pool)} (training regions of the demo image)")
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
        mask = layout[window] if self.labelled else None
        return Record(image=image[window].copy(), mask=None if mask is None else mask.copy(),
                      case=f"region_{region:02d}")

    def cases(self) -> list[str]:
        return [f"region_{region:02d}" for region in self.regions]
