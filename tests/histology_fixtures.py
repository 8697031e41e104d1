"""Writers of tiny GlaS and MoNuSeg folders in the official on-disk formats (BMP; TIFF + XML)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def glas_instances(height: int, width: int, count: int) -> np.ndarray:
    """``count`` disjoint rectangular glands with ids 1..count in a row (each 3 px wide, 4 px tall)."""
    instances = np.zeros((height, width), dtype=np.uint8)
    for i in range(count):
        instances[2:6, 1 + 4 * i: 4 + 4 * i] = i + 1
    return instances


def write_glas(root: Path, train: int = 11, test_a: int = 2, test_b: int = 1, size: tuple[int, int] = (16, 24),
               test_size: tuple[int, int] | None = None, seed: int = 0) -> dict[str, int]:
    """Write ``train_i``/``testA_i``/``testB_i`` BMPs + ``*_anno.bmp``; return {name: instance count}.

    Training images are ``size`` (H, W), test images ``test_size`` (default: ``size``).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    counts = {}
    for part, n in (("train", train), ("testA", test_a), ("testB", test_b)):
        shape = size if part == "train" or test_size is None else test_size
        for i in range(1, n + 1):
            name = f"{part}_{i}"
            counts[name] = 1 + (i % 4)
            image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / f"{name}.bmp")
            Image.fromarray(glas_instances(*shape, counts[name])).save(root / f"{name}_anno.bmp")
    (root / "Grade.csv").write_text("name, patient ID, grade (GlaS)\n")
    return counts


def write_monuseg_xml(path: Path, polygons: list[list[tuple[float, float]]]) -> None:
    """An Aperio ImageScope XML with one ``Region`` per polygon of ``(x, y)`` vertices."""
    annotations = ET.Element("Annotations", MicronsPerPixel="0.252100")
    regions = ET.SubElement(ET.SubElement(annotations, "Annotation", Id="1"), "Regions")
    for i, polygon in enumerate(polygons, start=1):
        vertices = ET.SubElement(ET.SubElement(regions, "Region", Id=str(i), Type="0"), "Vertices")
        for x, y in polygon:
            ET.SubElement(vertices, "Vertex", X=str(x), Y=str(y), Z="0")
    ET.ElementTree(annotations).write(path)


# pixel (x, y) is centred at (x + 0.5, y + 0.5); a centre on a left/top edge is inside (stedm/data/rasterise.py)
RECTANGLE = [(1.5, 2.5), (5.5, 2.5), (5.5, 4.5), (1.5, 4.5)]  # pixels x 1..4, y 2..3: 8 pixels
TRIANGLE = [(10.5, 10.5), (10.5, 20.0), (20.0, 10.5)]  # pixels x, y >= 10 with x + y <= 29: 55 pixels


def write_monuseg(root: Path, train_dir: str = "train", test_dir: str = "test", train: int = 3, test: int = 1,
                  size: int = 24) -> list[list[list[tuple[float, float]]]]:
    """Write TIFF + XML pairs (official folder structure); image ``i`` holds ``i + 1`` polygons."""
    rng = np.random.default_rng(0)
    image_dir = root / train_dir / "Tissue Images"
    annotation_dir = root / train_dir / "Annotations"
    test_folder = root / test_dir
    for folder in (image_dir, annotation_dir, test_folder):
        folder.mkdir(parents=True, exist_ok=True)
    shapes = [RECTANGLE, TRIANGLE, [(x + 6, y) for x, y in RECTANGLE], [(x, y + 14) for x, y in RECTANGLE]]
    written = []
    for i in range(train + test):
        stem = f"TCGA-{i:02d}-0001"
        images, xmls = (image_dir, annotation_dir) if i < train else (test_folder, test_folder)
        polygons = shapes[: 1 + i % len(shapes)]
        tifffile.imwrite(images / f"{stem}.tif", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        write_monuseg_xml(xmls / f"{stem}.xml", polygons)
        written.append(polygons)
    return written
