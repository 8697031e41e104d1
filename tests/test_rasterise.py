"""The one polygon rasteriser (stedm.data.rasterise): pixel centres at +0.5, and MoNuSeg's XML
nuclei rasterise exactly as the same polygons in a whole-slide GeoJSON do."""

from __future__ import annotations

import numpy as np

from histology_fixtures import write_monuseg_xml
from stedm.data.datasets.monuseg import rasterise_instances, read_xml_polygons
from stedm.data.rasterise import Polygon, rasterise_polygons
from stedm.data.wsi.annotations import AnnotationSource, load_annotations
from wsi_fixtures import write_geojson

SQUARE = [(0.0, 0.0), (2.0, 0.0), (2.0, 2.0), (0.0, 2.0)]


def covered(ring, shape=(4, 4)) -> np.ndarray:
    return rasterise_polygons([Polygon.from_rings(1, [np.array(ring)])], 0.0, 0.0, 1.0, *shape, fill=0) == 1


def test_pixel_centres_are_at_plus_one_half():
    expected = np.zeros((4, 4), bool)
    expected[0:2, 0:2] = True  # the square (0, 0)-(2, 2) is exactly pixels 0..1 x 0..1
    assert np.array_equal(covered(SQUARE), expected)
    assert np.array_equal(rasterise_instances([np.array(SQUARE)], (4, 4)) == 1, expected)
    # centres on the left/top edge are inside, on the right/bottom edge outside
    assert np.array_equal(covered([(x + 0.5, y + 0.5) for x, y in SQUARE]), expected)
    # neighbours sharing an edge never both claim a pixel, and leave no gap
    right = [(x + 2.0, y) for x, y in SQUARE]
    assert not (covered(SQUARE) & covered(right)).any() and (covered(SQUARE) | covered(right))[:2].all()


def nuclei(count: int, seed: int = 0) -> list[list[tuple[float, float]]]:
    """Star-shaped nucleus outlines: radius 4-15 px, 20-40 vertices, in a 128 x 128 image."""
    rng = np.random.default_rng(seed)
    outlines = []
    for _ in range(count):
        n, radius = int(rng.integers(20, 41)), rng.uniform(4, 15)
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = radius * rng.uniform(0.8, 1.2, n)
        cx, cy = rng.uniform(-5, 133, 2)  # some cross the border
        outlines.append([(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for r, a in zip(radii, angles)])
    return outlines


def test_monuseg_and_wsi_annotations_give_the_same_mask(tmp_path):
    outlines = nuclei(40)
    write_monuseg_xml(tmp_path / "n.xml", outlines)
    instances = rasterise_instances(read_xml_polygons(tmp_path / "n.xml"), (128, 128))
    path = write_geojson(tmp_path / "n.geojson", [("Nucleus", [[*o, o[0]]]) for o in outlines])
    annotations, lookup = load_annotations(AnnotationSource.for_file(path), {"Nucleus": 1}, (128, 128), 1, 2, None)
    assert (instances > 0).sum() > 2000
    assert np.array_equal(instances > 0, lookup == 1)
    for instance_id, outline in enumerate(outlines[:5], start=1):  # each nucleus alone, too
        alone = rasterise_instances([np.array(outline)], (128, 128)) == 1
        assert np.array_equal(alone, covered(outline, (128, 128)))
        assert np.array_equal(alone & (instances == instance_id), instances == instance_id)
