"""Slide annotations: GeoJSON polygons, SlideRunner SQLite databases and label-mask images.

Formats (coordinates are level-0 pixels):

- **GeoJSON** (QuPath "Export objects"): a ``FeatureCollection`` or a list of features with
  ``Polygon`` / ``MultiPolygon`` geometries (holes allowed). The class name is
  ``properties.classification.name`` (QuPath), else ``properties.classification`` when it is
  a string, else ``properties.name``; features without any are ``"Unclassified"``. Points and
  lines carry no area and are skipped.
- **SlideRunner SQLite** (the public CATCH release): tables ``Slides`` (``uid, filename``),
  ``Annotations`` (``uid, slide, type, agreedClass, deleted``), ``Annotations_coordinates``
  (``annoId, coordinateX, coordinateY, orderIdx``), ``Classes`` (``uid, name``) and
  ``Annotations_label`` (``annoId, class``; used when ``agreedClass`` is unset). Polygons
  (type 3) and rectangles (type 2) are read, deleted annotations and spots/circles skipped; a
  slide is matched by its file name.
- **Label mask**: a single-channel PNG/TIFF aligned with the slide at any downsample (inferred
  from the sizes); pixel values are class ids, :data:`IGNORE_INDEX` (255) = not annotated.

Class names map to ids through ``label_dict`` (several names may share an id; an id of 255
drops those polygons); names missing from it raise :class:`UnknownClassNames`. Overlapping
polygons are painted largest first, so a smaller polygon nested in a larger one (a tumour in
the dermis) keeps its own class.

Each slide's annotations are rasterised once into a *lookup map* (class id per
``map_downsample`` level-0 pixels) and cached with the parsed polygons under ``cache_dir``,
keyed by the annotation file's content hash and every parameter that changes the result, so
later starts neither parse nor rasterise again.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from stedm.data.base import check_mask_values
from stedm.data.contract import IGNORE_INDEX
from stedm.data.wsi.cache import cache_key, file_digest, load_arrays, mask_cache_path, save_arrays, save_npy
from stedm.data.rasterise import Polygon, rasterise_polygons

FORMAT_VERSION = 1  # bump when parsing or rasterisation changes, to invalidate caches
UNCLASSIFIED = "Unclassified"
GEOJSON_SUFFIXES = (".geojson", ".json")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
SLIDERUNNER_POLYGON, SLIDERUNNER_RECTANGLE = 3, 2

NamedPolygon = tuple[str, list[np.ndarray]]  # class name, rings (exterior first)


class UnknownClassNames(ValueError):
    def __init__(self, names: set[str], path: Path) -> None:
        self.names, self.path = names, path
        super().__init__(f"{path}: class names {sorted(names)} are not in label_dict")


# -- readers ----------------------------------------------------------------------------------

def feature_class_name(properties: Mapping[str, Any]) -> str:
    classification = properties.get("classification")
    if isinstance(classification, Mapping) and classification.get("name"):
        return str(classification["name"])
    if isinstance(classification, str) and classification:
        return classification
    if properties.get("name"):
        return str(properties["name"])
    return UNCLASSIFIED


def geometry_polygons(geometry: Mapping[str, Any] | None) -> Iterator[list[np.ndarray]]:
    """Rings of every polygon in a GeoJSON geometry (areas only)."""
    if not geometry:
        return
    kind = geometry.get("type")
    if kind == "Polygon":
        yield [np.asarray(ring, dtype=np.float64)[:, :2] for ring in geometry["coordinates"]]
    elif kind == "MultiPolygon":
        for polygon in geometry["coordinates"]:
            yield [np.asarray(ring, dtype=np.float64)[:, :2] for ring in polygon]
    elif kind == "GeometryCollection":
        for part in geometry.get("geometries", []):
            yield from geometry_polygons(part)


def read_geojson(path: Path) -> list[NamedPolygon]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read GeoJSON {path}: {err}") from err
    if isinstance(data, Mapping):
        features = data.get("features", [data] if "geometry" in data else None)
    else:
        features = data
    if not isinstance(features, list):
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection or a list of features")
    return [(feature_class_name(f.get("properties") or {}), rings)
            for f in features for rings in geometry_polygons(f.get("geometry"))]


@lru_cache(maxsize=2)
def read_sliderunner(path: str, digest: str) -> dict[str, list[NamedPolygon]]:
    """Polygons per slide file name of a SlideRunner database (memoised per file content)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as err:
        raise ValueError(f"cannot read SQLite database {path}: {err}") from err
    needed = {"Slides", "Annotations", "Annotations_coordinates", "Classes", "Annotations_label"}
    if not needed <= tables:
        raise ValueError(f"{path} is not a SlideRunner database: tables {sorted(needed - tables)} missing")
    with db:
        classes = dict(db.execute("SELECT uid, name FROM Classes"))
        slides = dict(db.execute("SELECT uid, filename FROM Slides"))
        first_label = {}
        for anno, cls in db.execute("SELECT annoId, class FROM Annotations_label ORDER BY uid"):
            first_label.setdefault(anno, cls)
        annotations = db.execute(
            "SELECT uid, slide, type, agreedClass FROM Annotations WHERE deleted IS NULL OR deleted = 0").fetchall()
        rows = db.execute("SELECT annoId, coordinateX, coordinateY FROM Annotations_coordinates "
                          "ORDER BY annoId, orderIdx").fetchall()
    db.close()
    coords = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    ids = coords[:, 0].astype(np.int64)
    starts = np.searchsorted(ids, [a[0] for a in annotations], side="left")
    ends = np.searchsorted(ids, [a[0] for a in annotations], side="right")
    result: dict[str, list[NamedPolygon]] = {name: [] for name in slides.values()}
    for (uid, slide, kind, agreed), start, end in zip(annotations, starts, ends):
        points = coords[start:end, 1:]
        if kind == SLIDERUNNER_RECTANGLE and len(points) >= 2:
            (x1, y1), (x2, y2) = points[0], points[1]
            points = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
        elif kind != SLIDERUNNER_POLYGON or len(points) < 3:
            continue
        class_id = agreed if agreed else first_label.get(uid)
        name = classes.get(class_id, UNCLASSIFIED)
        if slide in slides:
            result[slides[slide]].append((str(name), [points]))
    return result


@lru_cache(maxsize=8)
def sliderunner_slide_names(path: str, digest: str) -> tuple[str, ...]:
    """File names in a SlideRunner database's ``Slides`` table (cheap: no coordinates read)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        with db:
            names = tuple(str(row[0]) for row in db.execute("SELECT filename FROM Slides"))
        db.close()
    except sqlite3.Error as err:
        raise ValueError(f"cannot read the Slides table of SlideRunner database {path}: {err}") from err
    return names


def read_label_image(path: Path) -> np.ndarray:
    """Single-channel label image -> uint8 2-D array."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        else:
            from PIL import Image

            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # label masks may be huge
            try:
                with Image.open(path) as im:
                    array = np.asarray(im)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except Exception as err:
        raise ValueError(f"cannot read label mask {path}: {err}") from err
    if array.ndim != 2:
        raise ValueError(f"label mask {path} must be single-channel class ids, got shape {array.shape}")
    if array.max(initial=0) > 255 or array.min(initial=0) < 0:
        raise ValueError(f"label mask {path} has values outside 0..255")
    return array.astype(np.uint8)


def label_polygons(named: list[NamedPolygon], label_dict: Mapping[str, int], path: Path) -> list[Polygon]:
    """Map class names to ids; largest polygon first (painter's order). Raises :class:`UnknownClassNames`."""
    unknown = {name for name, _ in named if name not in label_dict}
    if unknown:
        raise UnknownClassNames(unknown, path)
    polygons = [Polygon.from_rings(label_dict[name], rings) for name, rings in named
                if int(label_dict[name]) != IGNORE_INDEX]
    return sorted(polygons, key=lambda p: -p.area)


# -- one slide's annotations ------------------------------------------------------------------

@dataclass(frozen=True)
class AnnotationSource:
    """Where a slide's annotations are: ``kind`` is ``geojson``, ``sqlite`` or ``mask``;
    ``slide_key`` is the slide's file name in a SQLite database."""

    kind: str
    path: Path
    slide_key: str | None = None

    @classmethod
    def for_file(cls, path: Path) -> "AnnotationSource":
        suffix = path.suffix.lower()
        kind = "geojson" if suffix in GEOJSON_SUFFIXES else "mask" if suffix in MASK_SUFFIXES else None
        if kind is None:
            raise ValueError(f"unknown annotation format {path} (use {GEOJSON_SUFFIXES + MASK_SUFFIXES} "
                             "or a SlideRunner .sqlite database)")
        return cls(kind, Path(path))


class SlideAnnotations:
    """Rasterises a slide's annotations into any window: polygons, or a (memory-mapped) label mask."""

    def __init__(self, polygons: list[Polygon] | None = None, mask: np.ndarray | None = None,
                 mask_scale: tuple[float, float] = (1.0, 1.0)) -> None:
        self.polygons = polygons or []
        self.mask = mask
        self.mask_scale = mask_scale  # level-0 px per mask px along (x, y)
        self.from_cache = False  # set by load_annotations: read from cache_dir, not parsed and rasterised

    def rasterise(self, x0: float, y0: float, width: int, height: int, downsample: float) -> np.ndarray:
        """``uint8 height x width`` class ids at ``downsample`` from level-0 ``(x0, y0)``; 255 = unannotated."""
        if self.mask is None:
            return rasterise_polygons(self.polygons, x0, y0, downsample, height, width)
        out = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
        rows = np.floor((y0 + (np.arange(height) + 0.5) * downsample) / self.mask_scale[1]).astype(np.int64)
        cols = np.floor((x0 + (np.arange(width) + 0.5) * downsample) / self.mask_scale[0]).astype(np.int64)
        in_rows = (rows >= 0) & (rows < self.mask.shape[0])
        in_cols = (cols >= 0) & (cols < self.mask.shape[1])
        if in_rows.any() and in_cols.any():
            out[np.ix_(in_rows, in_cols)] = self.mask[np.ix_(rows[in_rows], cols[in_cols])]
        return out

    def lookup_map(self, slide_size: tuple[int, int], map_downsample: float) -> np.ndarray:
        width, height = (math.ceil(s / map_downsample) for s in slide_size)
        return self.rasterise(0.0, 0.0, width, height, map_downsample)


def pack_polygons(polygons: list[Polygon]) -> dict[str, np.ndarray]:
    return {"edges": np.concatenate([p.edges for p in polygons]) if polygons else np.zeros((0, 4)),
            "edge_counts": np.array([len(p.edges) for p in polygons], dtype=np.int64),
            "labels": np.array([p.label for p in polygons], dtype=np.int64),
            "bboxes": np.array([p.bbox for p in polygons], dtype=np.float64).reshape(-1, 4),
            "areas": np.array([p.area for p in polygons], dtype=np.float64)}


def unpack_polygons(arrays: Mapping[str, np.ndarray]) -> list[Polygon]:
    splits = np.split(arrays["edges"], np.cumsum(arrays["edge_counts"])[:-1]) if len(arrays["labels"]) else []
    return [Polygon(int(label), edges, tuple(bbox), float(area))
            for label, edges, bbox, area in zip(arrays["labels"], splits, arrays["bboxes"], arrays["areas"])]


def load_annotations(source: AnnotationSource, label_dict: Mapping[str, int], slide_size: tuple[int, int],
                     map_downsample: float, num_classes: int | None,
                     cache_dir: Path | None) -> tuple[SlideAnnotations, np.ndarray]:
    """A slide's :class:`SlideAnnotations` and lookup map, from the cache when it is there."""
    key = cache_key(FORMAT_VERSION, file_digest(source.path), source.kind, source.slide_key,
                    sorted((str(k), int(v)) for k, v in label_dict.items()), float(map_downsample), list(slide_size))
    cached = load_arrays(cache_dir, key)
    if cached is not None:
        if source.kind == "mask":
            mask = np.load(mask_cache_path(cache_dir, key), mmap_mode="r")
            annotations = SlideAnnotations(mask=mask, mask_scale=tuple(cached["mask_scale"]))
        else:
            annotations = SlideAnnotations(unpack_polygons(cached))
        annotations.from_cache = True
        return annotations, cached["lookup"]
    if source.kind == "mask":
        mask = read_label_image(source.path)
        check_mask_values(mask, num_classes, str(source.path))
        scale = (slide_size[0] / mask.shape[1], slide_size[1] / mask.shape[0])
        if abs(scale[0] - scale[1]) > 0.02 * max(scale):
            raise ValueError(f"label mask {source.path} is {mask.shape[1]}x{mask.shape[0]}, which is not the "
                             f"slide's {slide_size[0]}x{slide_size[1]} at one downsample (x {scale[0]:.3g}, "
                             f"y {scale[1]:.3g}); the mask must cover the whole slide")
        annotations = SlideAnnotations(mask=mask, mask_scale=scale)
        lookup = annotations.lookup_map(slide_size, map_downsample)
        if cache_dir is not None:
            save_npy(mask_cache_path(cache_dir, key), mask)
            save_arrays(cache_dir, key, {"lookup": lookup, "mask_scale": np.array(scale)})
            annotations.mask = np.load(mask_cache_path(cache_dir, key), mmap_mode="r")
        return annotations, lookup
    if source.kind == "sqlite":
        by_slide = read_sliderunner(str(source.path), file_digest(source.path))
        if source.slide_key not in by_slide:
            raise ValueError(f"slide '{source.slide_key}' is not in the Slides table of {source.path}")
        named = by_slide[source.slide_key]
    else:
        named = read_geojson(source.path)
    annotations = SlideAnnotations(label_polygons(named, label_dict, source.path))
    lookup = annotations.lookup_map(slide_size, map_downsample)
    save_arrays(cache_dir, key, {"lookup": lookup, **pack_polygons(annotations.polygons)})
    return annotations, lookup
