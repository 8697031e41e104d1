"""Whole-slide-image datasets (HER2, CATCH, your own slides): patches read on demand.

Folder layout (``root`` = e.g. ``${location.data_dir}/her2`` or ``.../catch``)::

    root/
      slides/                    the WSIs, any format OpenSlide reads (.svs .ndpi .mrxs tiled .tif ...)
      annotations/               per-slide annotations, named after the slide:
        <slide stem>.geojson       QuPath GeoJSON export (also <slide name>.geojson, .json), or
        <slide stem>.png           a label mask (class ids, 255 = unannotated; any downsample)
      CATCH.sqlite               or one SlideRunner database for all slides (``annotations_db``)
      slides.csv                 slide,case,split,subtype   (optional)

``slides.csv``: ``slide`` is the file name in ``slides/`` (or an absolute path); ``case``
(patient id, default the slide's stem) groups slides for per-patient metrics and splits;
``split`` is ``train``/``val``/``test`` (without it cases are split by ``val_fraction`` /
``test_fraction``); the column named by ``subtype_column`` (CATCH: ``subtype``, the tumour
type; HER2: ``score``, the slide's HER2 score 0-3) stratifies the labelled selection and is
reported as ``meta.subtype``. Without a CSV every slide in ``slides/`` is listed.

Roles and splits:

- ``role="labelled"``, ``split="train"``: the annotated training slides of
  ``class_train_samples`` cases per subtype (sorted, seeded; ``null`` = all). Each item is a
  ``patch_size`` patch at ``downsample`` drawn fresh on every access: a class group by its
  probability (``locations``), a slide uniformly among those containing the group, a point
  uniformly inside the group's area. ``len`` is the nominal ``epoch_length``; the DataModule's
  with-replacement sampler sets how many items an epoch really has. The draw is seeded by the
  index and torch's RNG, so it is reproducible under Lightning's per-worker seeding.
- ``role="labelled"``, ``split="val"|"test"``: every annotated region of the split's slides,
  whole, cut into units of at most ``max_unit_patches`` x ``patch_size`` pixels per side (see
  :mod:`stedm.data.wsi.regions`), with ``eval_context`` pixels of context around each (mask
  :data:`IGNORE_INDEX`, as are unannotated pixels: metrics count annotated pixels, each once).
  ``meta.case`` is the slide's case (per-patient metrics).
- ``role="unlabelled"``: the remaining training slides (the style / pretraining pool); items
  are patches at random tissue locations, without masks. For ``val``/``test`` the pool is
  read deterministically, one patch per slide.

Speed: a patch is read from the coarsest pyramid level at most as coarse as ``downsample`` and
area-resized; pyramids with a level at (or a factor 2 above) the training downsample read
fastest. Generic tiled TIFF and Aperio SVS slides are read by a tifffile tile reader with a cache
of ``tile_cache_mib`` decoded tiles per process (:mod:`stedm.data.wsi.slide`), other formats by
OpenSlide, which composites reads from levels whose downsample is not an integer (Aperio SVS:
4.0001, ...) through a slow sub-pixel path. ``python benchmarks/wsi.py --help`` measures both.

Every record's ``meta`` carries ``slide_index`` (into this dataset's slide list) and the level-0
patch centre ``centre_x``/``centre_y``, from which the slide style sources
(:class:`~stedm.data.style_sources.NearbyStyle`, :class:`~stedm.data.style_sources.MultiPatchStyle`) read more
patches through :meth:`WSIDataset.read_style_patches`, :meth:`WSIDataset.tissue_points` and
:meth:`WSIDataset.on_tissue`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from stedm.data.base import Record, SegmentationDataset, check_role
from stedm.data.contract import IGNORE_INDEX
from stedm.data.io import require_dir
from stedm.data.wsi.annotations import (
    GEOJSON_SUFFIXES,
    MASK_SUFFIXES,
    AnnotationSource,
    SlideAnnotations,
    UnknownClassNames,
    load_annotations,
    sliderunner_slide_names,
)
from stedm.data.wsi.cache import cache_key, file_digest, load_arrays, save_arrays
from stedm.data.wsi.regions import Box, evaluation_cores
from stedm.data.wsi.locations import MapPoints, parse_groups
from stedm.data.wsi.slide import READERS, SlideReader
from stedm.data.wsi.table import SlideInfo, read_slide_table, select_labelled
from stedm.data.wsi.tiles import TileCache
from stedm.data.wsi.tissue import TissueParams, detect_tissue

log = logging.getLogger(__name__)


def progress(items: Sequence, desc: str, unit: str = "slide") -> Any:
    """A tqdm bar over ``items`` on a terminal (none in logs or for a single item)."""
    return tqdm(items, desc=desc, unit=unit, leave=False, disable=None if len(items) > 1 else True)


class WSIDataset(SegmentationDataset):
    """Patches and annotated regions of whole-slide images (see the module docstring).

    Args:
        slides_dir: folder of the slides. csv_path: optional slide table.
        annotations_dir: folder of per-slide GeoJSON / label-mask files. annotations_db: a
            SlideRunner SQLite database (slides matched by file name, else by stem).
        label_dict: annotation class name -> class id (255 drops the polygons).
        role: ``labelled`` or ``unlabelled``. class_train_samples: labelled cases per subtype.
        subtype_column: CSV column of the subtype (``null``: none).
        patch_size: patch side in pixels. downsample: level-0 pixels per patch pixel.
        locations: where training patches are centred, ``{group: {probability: p, classes: [ids] |
            "unannotated"}}`` (``null``: anywhere annotated; :mod:`stedm.data.wsi.locations`).
        unannotated_label: training-mask class of pixels no annotation covers (``null``: ignored).
        epoch_length: nominal length of the training sets.
        annotation_downsample: level-0 pixels per lookup-map pixel.
        eval_context: context pixels around evaluation units. max_unit_patches: unit size cap.
        tissue: :class:`~stedm.data.wsi.tissue.TissueParams` fields.
        cache_dir: where lookup maps and tissue masks are cached (``null``: no cache).
        slide_reader: ``auto`` (tifffile tile reader for generic tiled TIFF and Aperio SVS, OpenSlide
            for other formats) or ``openslide`` (every slide; the slower reference path).
        tile_cache_mib: decoded tiles the tile reader keeps per process (each DataLoader worker) for
            this dataset's slides; OpenSlide keeps its own 128 MiB per process.
    """

    capabilities = frozenset({"slide"})

    def __init__(self, name: str, slides_dir: str, csv_path: str | None = None, annotations_dir: str | None = None,
                 annotations_db: str | None = None, label_dict: Mapping[str, int] | None = None,
                 role: str = "labelled", split: str = "train", class_train_samples: int | None = None,
                 subtype_column: str | None = None, patch_size: int = 512, downsample: float = 1.0,
                 locations: Mapping[str, Any] | None = None, unannotated_label: int | None = None,
                 epoch_length: int = 1000, annotation_downsample: float = 64.0, eval_context: int = 0,
                 max_unit_patches: int = 4, tissue: Mapping[str, Any] | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, seed: int = 0, cache_dir: str | None = None, slide_reader: str = "auto",
                 tile_cache_mib: float = 128, **kwargs) -> None:
        super().__init__(name=name, split=split, **kwargs)
        where = f"dataset '{name}'"
        check_role(role, where)
        sizes = {"patch_size": patch_size, "downsample": downsample, "annotation_downsample": annotation_downsample,
                 "epoch_length": epoch_length, "max_unit_patches": max_unit_patches}
        if any(v <= 0 for v in sizes.values()) or eval_context < 0 or tile_cache_mib < 0:
            raise ValueError(f"{where}: {', '.join(sizes)} must be positive and eval_context, tile_cache_mib >= 0, "
                             f"got {sizes}, eval_context={eval_context}, tile_cache_mib={tile_cache_mib}")
        if slide_reader not in READERS:
            raise ValueError(f"{where}: slide_reader must be one of {READERS}, got '{slide_reader}'")
        self.role, self.where = role, where
        self.patch_size, self.downsample = int(patch_size), float(downsample)
        self.annotation_downsample = float(annotation_downsample)
        self.epoch_length = int(epoch_length)
        self.eval_context, self.max_unit = int(eval_context), int(max_unit_patches) * int(patch_size)
        self.unannotated_label = self._check_label(unannotated_label, "unannotated_label")
        self.label_dict = {str(k): self._check_label(v, f"label_dict['{k}']") for k, v in (label_dict or {}).items()}
        self.tissue_params = TissueParams(**(tissue or {}))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.seed = int(seed)

        root = require_dir(slides_dir, "slides", f"data.dataset.{name}.slides_dir")
        self.annotations_dir = require_dir(annotations_dir, "annotations", f"data.dataset.{name}.annotations_dir") \
            if annotations_dir else None
        self.annotations_db = Path(annotations_db) if annotations_db else None
        if self.annotations_db is not None and not self.annotations_db.is_file():
            raise FileNotFoundError(f"{where}: annotation database not found: {self.annotations_db} (annotations_db)")
        table = read_slide_table(root, csv_path, subtype_column, val_fraction, test_fraction, seed, where)
        sources = {s.path: self._find_annotation(s.path) for s in table}
        labelled = select_labelled(table, class_train_samples, seed, {p for p, src in sources.items() if src})
        if role == "unlabelled":
            chosen = [s for s in table if s.split == "train" and s.path not in labelled]
        elif split == "train":
            chosen = [s for s in table if s.path in labelled]
        else:
            chosen = [s for s in table if s.split == split and sources[s.path] is not None]
            skipped = sum(s.split == split and sources[s.path] is None for s in table)
            if skipped:
                warnings.warn(f"{where}: {skipped} {split} slides have no annotations and are not evaluated",
                              stacklevel=2)
        if not chosen:
            raise ValueError(f"{where}: no {role} slides for split '{split}' (check the slide table's split column, "
                             "the annotations and class_train_samples)")
        self.slides: list[SlideInfo] = chosen
        self.tile_cache = TileCache(round(tile_cache_mib * 2**20))
        log.info("%s: %d %s %s slide(s) of %d listed", where, len(chosen), role, split, len(table))
        self.readers = [SlideReader(s.path, slide_reader, self.tile_cache)
                        for s in progress(chosen, f"{where}: opening slides")]
        self.has_subtypes = any(s.subtype for s in table)
        self._tissue: dict[int, MapPoints] = {}
        self._tissue_cached: set[int] = set()  # slides whose tissue mask came from cache_dir

        self.annotations: list[SlideAnnotations] = []
        self.units: list[tuple[int, Box]] = []
        self.groups, self.group_slides = [], []
        if role == "labelled":
            lookups = self._load_annotations([sources[s.path] for s in chosen])
            if split == "train":
                self._build_locations(locations, lookups)
            else:
                self.units = [(i, core) for i, lookup in enumerate(lookups) for core in
                              evaluation_cores(lookup, self.annotation_downsample, self.downsample, self.max_unit)]
                if not self.units:
                    raise ValueError(f"{where}: the {split} slides' annotations cover no pixel")
        needs_tissue = role == "unlabelled" or "slide" in getattr(self.style_source, "requires", ())
        if needs_tissue:  # computed here, before DataLoader workers fork, so each worker need not
            start = time.perf_counter()
            for i in progress(range(len(self.slides)), f"{where}: tissue masks"):
                self.tissue_map(i)
            hits = len(self._tissue_cached)
            log.info("%s: tissue masks of %d slide(s) in %.1f s (%d from cache, %d detected on thumbnails)",
                     where, len(self.slides), time.perf_counter() - start, hits, len(self.slides) - hits)

    # -- construction helpers -----------------------------------------------------------------
    def _check_label(self, value: int | None, key: str) -> int | None:
        if value is None:
            return None
        value = int(value)
        if value != IGNORE_INDEX and self.num_classes is not None and not 0 <= value < self.num_classes:
            raise ValueError(f"{self.where}: {key}={value} must be a class id in 0..{self.num_classes - 1} "
                             f"or {IGNORE_INDEX} (ignore)")
        return value

    def _find_annotation(self, slide: Path) -> AnnotationSource | None:
        if self.annotations_dir is not None:
            for stem in (slide.stem, slide.name):
                for suffix in GEOJSON_SUFFIXES + MASK_SUFFIXES:
                    candidate = self.annotations_dir / f"{stem}{suffix}"
                    if candidate.is_file():
                        return AnnotationSource.for_file(candidate)
        if self.annotations_db is not None:
            names = sliderunner_slide_names(str(self.annotations_db), file_digest(self.annotations_db))
            matches = [n for n in names if n == slide.name] or [n for n in names if Path(n).stem == slide.stem]
            if matches:
                return AnnotationSource("sqlite", self.annotations_db, matches[0])
        return None

    def _load_annotations(self, sources: Sequence[AnnotationSource]) -> list[np.ndarray]:
        lookups, unknown, files = [], set(), []
        begin, hits = time.perf_counter(), 0
        for reader, source in progress(list(zip(self.readers, sources)), f"{self.where}: annotations"):
            start = time.perf_counter()
            try:
                annotations, lookup = load_annotations(source, self.label_dict, reader.dimensions,
                                                       self.annotation_downsample, self.num_classes, self.cache_dir)
            except UnknownClassNames as err:
                unknown |= err.names
                files.append(str(err.path))
                continue
            hits += annotations.from_cache
            what = "label mask" if annotations.mask is not None else f"{len(annotations.polygons)} polygons"
            log.info("%s: %s: %s from %s, lookup map %dx%d, %s", self.where, reader.path.name, what,
                     source.path.name, lookup.shape[1], lookup.shape[0], "from cache" if annotations.from_cache
                     else f"parsed and rasterised in {time.perf_counter() - start:.1f} s")
            self.annotations.append(annotations)
            lookups.append(lookup)
        log.info("%s: annotations of %d slide(s) in %.1f s (%d from cache, %d parsed)", self.where, len(lookups),
                 time.perf_counter() - begin, hits, len(lookups) - hits)
        if unknown:
            raise ValueError(f"{self.where}: annotation class names {sorted(unknown)} are not in data.label_dict "
                             f"(found in {sorted(set(files))[:5]}); add them with their class id, or 255 to drop them")
        return lookups

    def _build_locations(self, locations: Mapping[str, Any] | None, lookups: list[np.ndarray]) -> None:
        for group in parse_groups(locations, self.num_classes, self.where):
            areas = [(i, MapPoints(lookup, group.values, self.annotation_downsample))
                     for i, lookup in enumerate(lookups)]
            areas = [(i, a) for i, a in areas if a.count > 0]
            if not areas:
                if group.probability > 0:
                    warnings.warn(f"{self.where}: no labelled training slide contains locations group "
                                  f"'{group.name}'; its probability {group.probability} goes to the others",
                                  stacklevel=3)
                continue
            self.groups.append(group)
            self.group_slides.append(areas)
        if not self.groups or sum(g.probability for g in self.groups) <= 0:
            raise ValueError(f"{self.where}: no locations group with positive probability has annotated pixels")
        probabilities = np.array([g.probability for g in self.groups])
        self.group_probabilities = probabilities / probabilities.sum()

    # -- items ----------------------------------------------------------------------------------
    @property
    def labelled(self) -> bool:
        return self.role == "labelled"

    @property
    def patch_extent(self) -> float:
        """Side of a patch in level-0 pixels."""
        return self.patch_size * self.downsample

    def __len__(self) -> int:
        if self.split == "train":
            return self.epoch_length
        return len(self.units) if self.labelled else len(self.slides)

    def cases(self) -> list[str]:
        """Cases of the evaluation units; for nominal training items, of the slides they come from."""
        if self.units:
            return [self.slides[slide].case for slide, _ in self.units]
        return [s.case for s in self.slides]

    def load(self, index: int) -> Record:
        if self.split != "train":
            if self.labelled:
                return self._unit_record(index)
            rng = np.random.default_rng([self.seed, index])
            slide = index % len(self.slides)
            return self._patch_record(slide, self.tissue_points(slide, 1, rng)[0])
        rng = np.random.default_rng([index, int(torch.randint(0, 2**31 - 1, (1,)).item())])
        if not self.labelled:
            slide = int(rng.integers(len(self.slides)))
            return self._patch_record(slide, self.tissue_points(slide, 1, rng)[0])
        group = int(rng.choice(len(self.groups), p=self.group_probabilities))
        slide, area = self.group_slides[group][int(rng.integers(len(self.group_slides[group])))]
        return self._patch_record(slide, area.sample(1, rng)[0])

    def _meta(self, slide: int, x: float, y: float) -> dict[str, Any]:
        meta = {"slide_index": slide, "centre_x": round(x), "centre_y": round(y)}
        if self.has_subtypes:
            meta["subtype"] = self.slides[slide].subtype
        return meta

    def _patch_record(self, slide: int, centre: Sequence[float]) -> Record:
        x, y = float(centre[0]), float(centre[1])
        reader = self.readers[slide]
        x0, y0 = reader.patch_origin(x, y, self.patch_size, self.downsample)
        image = reader.read(x0, y0, self.patch_size, self.patch_size, self.downsample)
        mask = None
        if self.labelled:
            mask = self.annotations[slide].rasterise(x0, y0, self.patch_size, self.patch_size, self.downsample)
            if self.unannotated_label is not None:
                mask[mask == IGNORE_INDEX] = self.unannotated_label
        return Record(image=image, mask=mask, case=self.slides[slide].case, meta=self._meta(slide, x, y))

    def _unit_record(self, index: int) -> Record:
        """An evaluation unit: its core with context, grown to at least one patch; mask ignored outside the core."""
        slide, (x0, y0, x1, y1) = self.units[index]
        pad_x = max(self.eval_context, math.ceil((self.patch_size - (x1 - x0)) / 2))
        pad_y = max(self.eval_context, math.ceil((self.patch_size - (y1 - y0)) / 2))
        width, height = x1 - x0 + 2 * pad_x, y1 - y0 + 2 * pad_y
        ox, oy = (x0 - pad_x) * self.downsample, (y0 - pad_y) * self.downsample  # level-0 origin on the unit grid
        image = self.readers[slide].read(round(ox), round(oy), width, height, self.downsample)
        labels = self.annotations[slide].rasterise(ox, oy, width, height, self.downsample)
        mask = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
        mask[pad_y:height - pad_y, pad_x:width - pad_x] = labels[pad_y:height - pad_y, pad_x:width - pad_x]
        centre = ((x0 + x1) / 2 * self.downsample, (y0 + y1) / 2 * self.downsample)
        return Record(image=image, mask=mask, case=self.slides[slide].case, meta=self._meta(slide, *centre))

    # -- what slide style sources use ------------------------------------------------------------
    def tissue_map(self, slide: int) -> MapPoints:
        """Uniform points over the slide's tissue (detected on a thumbnail; cached on disk)."""
        if slide not in self._tissue:
            reader, params = self.readers[slide], self.tissue_params
            stat = reader.path.stat()
            key = cache_key("tissue", str(reader.path.resolve()), stat.st_size, stat.st_mtime_ns, asdict(params))
            cached, start = load_arrays(self.cache_dir, key), time.perf_counter()
            if cached is not None:
                mask = cached["tissue"]
            else:
                mask = detect_tissue(reader.thumbnail(params.downsample), params).astype(np.uint8)
                save_arrays(self.cache_dir, key, {"tissue": mask})
            log.info("%s: %s: tissue on %.0f%% of a %dx%d thumbnail, %s", self.where, reader.path.name,
                     100 * float(mask.mean()) if mask.size else 0.0, mask.shape[1], mask.shape[0],
                     "from cache" if cached is not None else f"detected in {time.perf_counter() - start:.1f} s")
            if not mask.any():
                warnings.warn(f"{self.where}: no tissue found on {reader.path.name} (tissue.threshold="
                              f"{params.threshold}); using the whole slide", stacklevel=2)
                mask = np.ones_like(mask)
            self._tissue[slide] = MapPoints(mask, (1,), params.downsample)
            if cached is not None:
                self._tissue_cached.add(slide)
        return self._tissue[slide]

    def tissue_points(self, slide: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n x 2`` level-0 ``(x, y)`` points uniform over the slide's tissue."""
        return self.tissue_map(slide).sample(n, rng)

    def on_tissue(self, slide: int, points: np.ndarray) -> np.ndarray:
        """Whether each level-0 ``(x, y)`` point lies on the slide's tissue."""
        tissue = self.tissue_map(slide)
        cells = np.floor(np.asarray(points, dtype=np.float64) / tissue.downsample).astype(np.int64)
        height, width = tissue.labels.shape
        inside = (cells[:, 0] >= 0) & (cells[:, 0] < width) & (cells[:, 1] >= 0) & (cells[:, 1] < height)
        result = np.zeros(len(cells), dtype=bool)
        result[inside] = tissue.labels[cells[inside, 1], cells[inside, 0]] > 0
        return result

    def read_style_patches(self, record: Record, centres: np.ndarray) -> list[np.ndarray]:
        """``patch_size`` patches at this dataset's downsample, centred on level-0 ``centres`` of the record's slide."""
        reader = self.readers[record.meta["slide_index"]]
        return [reader.read_centred(float(x), float(y), self.patch_size, self.downsample) for x, y in centres]
