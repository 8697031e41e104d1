"""The dataset loaders: one module per kind of data a ``conf/data`` entry can name.

Each turns a folder (or a pair folder) into :class:`~stedm.data.base.SegmentationDataset`
items; ``conf/data/dataset/*.yaml`` instantiates them. The whole-slide loader lives with its
machinery in :mod:`stedm.data.wsi`; the rest of :mod:`stedm.data` is machinery shared by all
loaders (the DataModule, epoch mixing, style sources, transforms, the pair folder format).
"""
