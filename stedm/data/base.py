"""Base class of every registry dataset.

A subclass says how to *load* one record (uint8 image, class-id mask or ``None``, case id);
this base turns records into samples of the contract in :mod:`stedm.data.contract`:
joint image/mask augmentation, style images from the active style source, range conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from stedm.data.contract import IGNORE_INDEX, image_to_tensor, mask_to_tensor
from stedm.data.io import read_image
from stedm.data.transforms import seed_transform

SPLITS = ("train", "val", "test")
ROLES = ("labelled", "unlabelled")


def check_role(role: str, where: str) -> str:
    """``role`` if it is ``labelled`` or ``unlabelled``; otherwise an error naming ``where``."""
    if role not in ROLES:
        raise ValueError(f"{where}: role must be one of {ROLES}, got '{role}'")
    return role


@dataclass
class Record:
    """One loaded item before augmentation."""

    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray | None  # H x W int class ids, None when unlabelled
    case: str
    instances: np.ndarray | None = None  # H x W instance ids, 0 = background
    meta: dict[str, Any] = field(default_factory=dict)  # extra meta (subtype, path, location...)


class SegmentationDataset(Dataset):
    """Registry dataset: subclasses implement :meth:`__len__` and :meth:`load`.

    ``capabilities`` names what the dataset can offer a style source beyond the target image
    (e.g. ``"slide"`` for whole-slide datasets that can read nearby patches); a source that
    requires a capability the dataset lacks is refused before training starts.
    """

    capabilities: frozenset[str] = frozenset()

    def __init__(
        self,
        name: str,
        split: str = "train",
        num_classes: int | None = None,
        transform: Callable | None = None,
        style_source: Any | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"dataset '{name}': split must be one of {SPLITS}, got '{split}'")
        self.name = name
        self.split = split
        self.num_classes = num_classes
        self.transform = transform
        self.style_source = style_source

    # -- to implement -------------------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> Record:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def labelled(self) -> bool:
        """Whether this dataset's masks are real annotations."""
        return True

    def cases(self) -> list[str]:
        """Case id of every item (used for statistics and per-case metrics)."""
        return [self.load(i).case for i in range(len(self))]

    def files(self) -> list[Path]:
        """Every file :meth:`load` reads, for the one full read before training
        (:mod:`stedm.data.verify`); none by default (embedded data, whole slides read patch by patch)."""
        return []

    def read_file(self, path: Path) -> None:
        """Read one of :meth:`files` in full; raise, naming it, if it is broken."""
        read_image(path)

    # -- shared -------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.load(index)
        image, mask, instances = record.image, record.mask, record.instances
        # One draw from torch's RNG (seeded per worker by Lightning) seeds this sample's
        # augmentation and style sampling: reproducible, and different in every worker.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        if self.transform is not None:
            if hasattr(self.transform, "set_random_state"):
                seed_transform(self.transform, seed)
            masks = [m for m in (mask, instances) if m is not None]
            out = self.transform(image=image, masks=masks) if masks else self.transform(image=image)
            image = out["image"]
            masks = list(out.get("masks", []))
            if mask is not None:
                mask = masks.pop(0)
            if instances is not None:
                instances = masks.pop(0)
        sample: dict[str, Any] = {
            "image": image_to_tensor(image),
            "mask": mask_to_tensor(mask if self.labelled else None, image.shape[:2]),
            "labelled": bool(self.labelled and mask is not None),
            "meta": {"source": self.name, "case": str(record.case), "index": int(index), **record.meta},
        }
        if instances is not None:
            sample["instances"] = torch.from_numpy(np.ascontiguousarray(instances)).to(torch.int64)
        if self.style_source is not None and self.style_source.num_images > 0:
            rng = np.random.default_rng(seed)
            styles = self.style_source(self, record, image, rng)
            sample["style"] = image_to_tensor(np.stack(styles))
        return sample


def check_mask_values(mask: np.ndarray, num_classes: int | None, where: str) -> None:
    """Refuse class ids outside ``0..num_classes-1`` (``IGNORE_INDEX`` allowed), naming the file."""
    if num_classes is None:
        return
    values = np.unique(mask)
    bad = values[(values != IGNORE_INDEX) & ((values < 0) | (values >= num_classes))]
    if bad.size:
        raise ValueError(
            f"{where}: mask has class ids {bad.tolist()} outside 0..{num_classes - 1}; "
            "fix the mask, its palette, or data.num_classes")
