"""MoNuSeg (MICCAI 2018 multi-organ nuclei segmentation), official layout, 2 classes (background, nucleus)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from stedm.data.datasets.official_split import ImageItem, OfficialSplitDataset, pair_by_stem
from stedm.data.rasterise import Polygon, open_ring, rasterise_polygons

TIFF_SUFFIXES = (".tif", ".tiff")


def read_xml_polygons(path: Path) -> list[np.ndarray]:
    """The ``Region`` polygons of a MoNuSeg (Aperio ImageScope) XML, each ``N x 2`` float ``(x, y)``, in file order."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"cannot read MoNuSeg annotation '{path}': {exc}") from exc
    polygons = []
    for region in root.iter("Region"):
        try:
            vertices = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: Region {region.get('Id')} has a Vertex without numeric X/Y") from exc
        polygons.append(np.asarray(vertices, dtype=np.float64).reshape(-1, 2))
    return polygons


def rasterise_instances(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance map ``H x W`` int32: polygon ``i`` (0-based) fills id ``i + 1``, 0 = background.

    A pixel belongs to a polygon when its centre lies inside it; pixel ``(row, col)`` is the unit
    square from ``(col, row)`` to ``(col + 1, row + 1)``, the convention of the whole-slide
    annotations (:mod:`stedm.data.rasterise`). Parts outside the image are cut off. Where
    polygons overlap, the later one wins. A polygon with fewer than 3 vertices (a closing repeat
    of the first not counted), or one that holds no pixel centre, fills nothing (its id is unused).
    """
    shapes = [Polygon.from_rings(instance_id, [vertices]) for instance_id, vertices in enumerate(polygons, start=1)
              if len(open_ring(vertices)) >= 3]
    return rasterise_polygons(shapes, 0.0, 0.0, 1.0, *shape, fill=0, dtype=np.int32)


def read_tiff_rgb(path: Path) -> np.ndarray:
    """An RGB(A) TIFF as ``H x W x 3`` uint8 (alpha dropped)."""
    try:
        image = tifffile.imread(path)
    except Exception as exc:  # tifffile raises several types for broken files
        raise ValueError(f"cannot read image '{path}': {exc}") from exc
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"'{path}': expected an 8-bit RGB(A) image, got shape {image.shape} {image.dtype}")
    return np.ascontiguousarray(image[..., :3])


class MoNuSegDataset(OfficialSplitDataset):
    """MoNuSeg in its official layout; roles and splits follow :mod:`stedm.data.datasets.official_split`.

    Expected layout (folder names are arguments; the defaults are the short form)::

        <root>/<train_dir>/<image_dir>/*.tif        train_dir="train", image_dir="Tissue Images"
        <root>/<train_dir>/<annotation_dir>/*.xml   annotation_dir="Annotations"
        <root>/<test_dir>/*.tif + *.xml             test_dir="test"

    For the official downloads use ``train_dir="MoNuSeg 2018 Training Data"`` and
    ``test_dir="MoNuSegTestData"``. Every image needs an XML of the same stem. Each ``Region``
    of the XML becomes one instance (ids in file order; overlaps: later region wins, see
    :func:`rasterise_instances`). The mask is ``instances > 0``; the case id is the image stem.
    """

    def __init__(
        self,
        root: str | Path,
        role: str = "labelled",
        split: str = "train",
        class_train_samples: int | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        train_dir: str = "train",
        image_dir: str = "Tissue Images",
        annotation_dir: str = "Annotations",
        test_dir: str = "test",
        name: str = "monuseg",
        num_classes: int | None = 2,
        transform: Callable | None = None,
        style_source: Any | None = None,
    ) -> None:
        self.root = Path(root)
        self.train_images = self.root / train_dir / image_dir
        self.train_annotations = self.root / train_dir / annotation_dir
        self.test_folder = self.root / test_dir
        self.layout = (f"{self.train_images}/*.tif, {self.train_annotations}/*.xml, {self.test_folder}/*.tif + *.xml "
                       "(set train_dir/image_dir/annotation_dir/test_dir to your folder names)")
        super().__init__(name, role, split, num_classes, transform, style_source,
                         class_train_samples, val_fraction, seed)

    def _list(self, folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
        if not folder.is_dir():
            raise FileNotFoundError(f"MoNuSeg folder '{folder}' does not exist; expected {self.layout}")
        return [p for p in folder.iterdir() if p.suffix.lower() in suffixes]

    def _pair(self, image_folder: Path, annotation_folder: Path) -> list[ImageItem]:
        images = self._list(image_folder, TIFF_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"no .tif images in '{image_folder}'; expected {self.layout}")
        annotations = self._list(annotation_folder, (".xml",))
        return pair_by_stem(images, annotations, lambda stem: stem, f"MoNuSeg '{image_folder}'")

    def find_train_items(self) -> list[ImageItem]:
        return self._pair(self.train_images, self.train_annotations)

    def find_test_items(self) -> list[ImageItem]:
        return self._pair(self.test_folder, self.test_folder)

    def read_image(self, item: ImageItem) -> np.ndarray:
        return read_tiff_rgb(item.image_path)

    def read_instances(self, item: ImageItem, shape: tuple[int, int]) -> np.ndarray:
        return rasterise_instances(read_xml_polygons(item.annotation_path), shape)

    def read_file(self, path: Path) -> None:
        if path.suffix.lower() == ".xml":
            read_xml_polygons(path)
        else:
            read_tiff_rgb(path)
