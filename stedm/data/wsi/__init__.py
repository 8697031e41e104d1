"""Whole-slide-image data: lazy slide reading, annotations, tissue detection, the dataset.

See :mod:`stedm.data.wsi.dataset` for the folder layout and the roles of the dataset.
"""

from stedm.data.wsi.dataset import WSIDataset

__all__ = ["WSIDataset"]
