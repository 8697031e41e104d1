"""Writers of tiny whole-slide data in the real on-disk formats: pyramidal tiled TIFF (what
OpenSlide's generic-TIFF reader opens), QuPath GeoJSON, SlideRunner SQLite, label masks."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import tifffile

QUADRANT_COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]], dtype=np.uint8)
"""Top-left, top-right, bottom-left, bottom-right."""
TISSUE_COLOUR = (180, 90, 160)  # H&E pink: its RGB minimum (90) is far below the glass's


def quadrant_image(height: int, width: int) -> np.ndarray:
    image = np.empty((height, width, 3), dtype=np.uint8)
    hh, hw = height // 2, width // 2
    image[:hh, :hw], image[:hh, hw:] = QUADRANT_COLOURS[0], QUADRANT_COLOURS[1]
    image[hh:, :hw], image[hh:, hw:] = QUADRANT_COLOURS[2], QUADRANT_COLOURS[3]
    return image


def tissue_image(height: int, width: int, boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    """White glass with tissue-coloured rectangles ``(x0, y0, x1, y1)`` (level-0 pixels)."""
    image = np.full((height, width, 3), 245, dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = TISSUE_COLOUR
    return image


def write_levels(path: Path, levels: Sequence[np.ndarray], tile: int = 64, compression: str = "zlib") -> Path:
    """A tiled TIFF: ``levels[0]`` full resolution, each further level a page marked
    ``subfiletype=1`` (reduced image), as scanners write pyramids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(tile=(tile, tile), compression=compression, photometric="rgb")
    with tifffile.TiffWriter(path) as writer:
        writer.write(levels[0], **options)
        for level in levels[1:]:
            writer.write(level, subfiletype=1, **options)
    return path


def write_pyramid_tiff(path: Path, image: np.ndarray, factors: Sequence[int] = (2, 4), **options) -> Path:
    """``image`` plus its area-reduced copies by each of ``factors``."""
    reduced = [cv2.resize(image, (max(1, image.shape[1] // f), max(1, image.shape[0] // f)),
                          interpolation=cv2.INTER_AREA) for f in factors]
    return write_levels(path, [image, *reduced], **options)


def write_svs(path: Path, image: np.ndarray, factor: int = 4, tile: int = 64, jpeg_colour: str = "ycbcr") -> Path:
    """An Aperio-like SVS: JPEG tiles of ``image`` (description "Aperio ...", so OpenSlide's aperio
    reader opens it), a stripped thumbnail page, and one tiled level reduced by ``factor`` whose
    downsample is not an integer when the size is not a multiple of ``factor`` (1001 px / 4: 4.004).
    ``jpeg_colour``: ``ycbcr`` (photometric YCbCr) or ``rgb`` (photometric RGB with RGB JPEG data,
    no JFIF marker, as some Aperio scanners write)."""
    height, width = image.shape[:2]
    options = {"compression": "jpeg", "compressionargs": {"level": 95, "outcolorspace": jpeg_colour},
               "photometric": "rgb", "metadata": None}
    header = "Aperio Image Library v12.0.15\r\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as writer:
        writer.write(image, tile=(tile, tile), **options,
                     description=f"{header}{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q=95"
                                 "|AppMag = 20|MPP = 0.5")
        for size, tiled in (((width // 8, height // 8), False), ((width // factor, height // factor), True)):
            writer.write(cv2.resize(image, size, interpolation=cv2.INTER_AREA), **options,
                         **({"tile": (tile, tile)} if tiled else {}),
                         description=f"{header}{width}x{height} -> {size[0]}x{size[1]} - |AppMag = 20")
    return path


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def write_geojson(path: Path, features: Sequence[tuple[str, list]], style: str = "qupath") -> Path:
    """``features``: (class name, polygon rings). ``style``: where the class name goes."""
    def properties(name: str) -> dict:
        if style == "qupath":
            return {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}}
        return {"classification": name} if style == "string" else {"name": name}

    collection = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings}, "properties": properties(name)}
        for name, rings in features]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(collection))
    return path


def write_sliderunner(path: Path, slides: dict[str, Sequence[tuple[str, list]]], deleted: Sequence[str] = ()) -> Path:
    """A SlideRunner database: ``slides`` maps file name -> (class name, polygon vertices; two
    vertices = a rectangle annotation by its corners); polygons of the classes in ``deleted`` are
    stored with ``deleted = 1``. Class ids come from
    the ``Classes`` table; half the annotations give it as ``agreedClass``, the others only
    through ``Annotations_label`` (both are SlideRunner's ways of storing it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE Slides (uid INTEGER PRIMARY KEY AUTOINCREMENT, filename TEXT, width INTEGER, height INTEGER,
                             directory TEXT, uuid TEXT, exactImageID TEXT, EXACTUSER INTEGER DEFAULT 0);
        CREATE TABLE Classes (uid INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, color TEXT);
        CREATE TABLE Annotations (uid INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT, deleted INTEGER DEFAULT 0,
                                  slide INTEGER, type INTEGER, agreedClass INTEGER, lastModified REAL,
                                  description TEXT);
        CREATE TABLE Annotations_coordinates (uid INTEGER PRIMARY KEY AUTOINCREMENT, coordinateX INTEGER,
                                              coordinateY INTEGER, coordinateZ INTEGER DEFAULT 0, slide INTEGER,
                                              annoId INTEGER, orderIdx INTEGER);
        CREATE TABLE Annotations_label (uid INTEGER PRIMARY KEY AUTOINCREMENT, exact_id INTEGER,
                                        person INTEGER DEFAULT 0, class INTEGER, annoId INTEGER);
    """)
    class_ids: dict[str, int] = {}
    for filename, polygons in slides.items():
        slide = db.execute("INSERT INTO Slides (filename) VALUES (?)", (filename,)).lastrowid
        for k, (name, vertices) in enumerate(polygons):
            if name not in class_ids:
                class_ids[name] = db.execute("INSERT INTO Classes (name, color) VALUES (?, '#ff0000')",
                                             (name,)).lastrowid
            agreed = class_ids[name] if k % 2 == 0 else None
            kind = 2 if len(vertices) == 2 else 3  # SlideRunner's AREA (rectangle) and POLYGON types
            anno = db.execute("INSERT INTO Annotations (slide, type, agreedClass, deleted) VALUES (?, ?, ?, ?)",
                              (slide, kind, agreed, int(name in deleted))).lastrowid
            db.execute("INSERT INTO Annotations_label (class, annoId) VALUES (?, ?)", (class_ids[name], anno))
            # stored in reverse so that only orderIdx gives the vertex order
            rows = [(int(x), int(y), slide, anno, i) for i, (x, y) in enumerate(vertices)][::-1]
            db.executemany("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx) "
                           "VALUES (?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    return path


# -- a CATCH-like folder: slides/, CATCH.sqlite, slides.csv -------------------------------------

SLIDE_SIZE = 512
TISSUE_BOX = (64, 64, 448, 448)  # tissue on every slide
DERMIS = [(64, 64), (448, 64), (448, 448), (64, 448)]  # background class, the whole tissue
TUMOUR = [(160, 160), (352, 160), (352, 352), (160, 352)]  # nested inside the dermis


def write_catch(root: Path, subtypes: Sequence[str] = ("Melanoma", "SCC"), train_per_subtype: int = 3,
                val_per_subtype: int = 1) -> dict[str, list[str]]:
    """CATCH layout with ``train_per_subtype + val_per_subtype`` 512-px slides per subtype, each
    with a dermis square and a tumour square of its subtype inside. Returns slide names per split."""
    image = tissue_image(SLIDE_SIZE, SLIDE_SIZE, [TISSUE_BOX])
    rows, annotations, names = [], {}, {"train": [], "val": []}
    for subtype in subtypes:
        for i in range(train_per_subtype + val_per_subtype):
            split = "train" if i < train_per_subtype else "val"
            name = f"{subtype.replace(' ', '_')}_{i}.tif"
            write_pyramid_tiff(root / "slides" / name, image)
            annotations[name] = [("Dermis", DERMIS), (subtype, TUMOUR)]
            rows.append(f"{name},{name[:-4]},{split},{subtype}")
            names[split].append(name)
    write_sliderunner(root / "CATCH.sqlite", annotations)
    (root / "slides.csv").write_text("\n".join(["slide,case,split,subtype", *rows]) + "\n")
    return names


def write_wsi_folder(root: Path, slides: dict[str, tuple[np.ndarray, list | None]], csv_rows: list[str] | None = None,
                     header: str = "slide,case,split,subtype") -> Path:
    """``slides``: name -> (level-0 image, GeoJSON features or None)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for name, (image, features) in slides.items():
        write_pyramid_tiff(root / "slides" / f"{name}.tif", image, factors=(2,))
        if features is not None:
            write_geojson(root / "annotations" / f"{name}.geojson", features)
    if csv_rows is not None:
        (root / "slides.csv").write_text("\n".join([header, *csv_rows]) + "\n")
    return root
