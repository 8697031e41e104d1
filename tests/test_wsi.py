"""Whole-slide data: slide reading, annotation rasterisation, sampling, evaluation tiling, slide
style sources and the her2/catch configs, on tiny slides written in the real formats."""

from __future__ import annotations

import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from matplotlib.path import Path as MplPath
from PIL import Image

from stedm.data.base import Record
from stedm.data.contract import IGNORE_INDEX
from stedm.data.datamodule import StedmDataModule
from stedm.data.style_sources import MultiPatchStyle, NearbyStyle
from stedm.data.wsi import WSIDataset
from stedm.data.wsi.annotations import AnnotationSource, load_annotations
from stedm.data.rasterise import Polygon, rasterise_polygons
from stedm.data.wsi.slide import SlideReader
from stedm.data.wsi.tissue import TissueParams, detect_tissue
from wsi_fixtures import (
    DERMIS,
    QUADRANT_COLOURS,
    TISSUE_COLOUR,
    TUMOUR,
    quadrant_image,
    rectangle,
    tissue_image,
    write_catch,
    write_geojson,
    write_levels,
    write_sliderunner,
    write_wsi_folder,
)

CATCH_LABELS = {"Dermis": 0, "Melanoma": 3, "SCC": 6}


def quadrant_colours_at(image: np.ndarray, margin: int = 2) -> list[np.ndarray]:
    """The four quadrants' pixels away from the midlines and the slide's edge (TL, TR, BL, BR)."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    m = margin
    return [image[m:h - m, m:w - m], image[m:h - m, w + m:-m], image[h + m:-m, m:w - m], image[h + m:-m, w + m:-m]]


# -- slide reading ------------------------------------------------------------------------------

def test_pyramid_reads_each_downsample_from_the_best_level(tmp_path):
    # Each level is tinted by 8 x its index, so a read shows which level it came from.
    levels = [np.clip(quadrant_image(256 // f, 256 // f).astype(int) + 8 * k, 0, 255).astype(np.uint8)
              for k, f in enumerate((1, 2, 4))]
    reader = SlideReader(write_levels(tmp_path / "pyramid.tif", levels))
    assert reader.dimensions == (256, 256)
    for downsample, level in ((1, 0), (2, 1), (3, 1), (4, 2), (8, 2)):
        size = math.ceil(256 / downsample)
        image = reader.read(0, 0, size, size, downsample)
        assert image.shape == (size, size, 3)
        for quadrant, colour in zip(quadrant_colours_at(image), QUADRANT_COLOURS):
            expected = np.clip(colour.astype(int) + 8 * level, 0, 255)
            assert np.all(quadrant == expected), (downsample, level)
    # A centred patch lies in one quadrant; outside the slide is white.
    patch = reader.read_centred(192, 64, 16, 2)
    assert np.all(patch == np.clip(QUADRANT_COLOURS[1].astype(int) + 8, 0, 255))
    assert np.all(reader.read(-64, -64, 32, 32, 1) == 255)


def test_single_level_slide_and_pickling(tmp_path):
    reader = SlideReader(write_levels(tmp_path / "flat.tif", [quadrant_image(128, 128)]))
    image = reader.read(0, 0, 32, 32, 4)  # no pyramid: read at level 0, area-resized
    for quadrant, colour in zip(quadrant_colours_at(image, margin=1), QUADRANT_COLOURS):
        assert np.all(quadrant == colour)
    # After use the reader still pickles (the OpenSlide handle stays behind) and works again.
    clone = pickle.loads(pickle.dumps(reader))
    assert np.array_equal(clone.read(0, 0, 32, 32, 4), image)


def test_unreadable_slide_names_the_file(tmp_path):
    bad = tmp_path / "not_a_slide.tif"
    bad.write_bytes(b"no tiff here")
    with pytest.raises(ValueError, match="not_a_slide.tif"):
        SlideReader(bad)


# -- annotations --------------------------------------------------------------------------------

def test_rasterised_pixels_are_those_whose_centre_is_inside():
    rng = np.random.default_rng(0)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 40))
    ring = np.c_[60 + rng.uniform(10, 50, 40) * np.cos(angles), 50 + rng.uniform(10, 50, 40) * np.sin(angles)]
    x0, y0, downsample, shape = -3.3, 1.7, 1.5, (70, 80)
    raster = rasterise_polygons([Polygon.from_rings(1, [ring])], x0, y0, downsample, *shape, fill=0)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    centres = np.c_[x0 + (cols.ravel() + 0.5) * downsample, y0 + (rows.ravel() + 0.5) * downsample]
    expected = MplPath(ring).contains_points(centres).reshape(shape)
    assert expected.sum() > 500 and np.array_equal(raster == 1, expected)


def expected_map(hole: bool) -> np.ndarray:
    """Lookup map (16 x 16 at downsample 8) of the polygons below, from pixel centres 8 j + 4."""
    expected = np.full((16, 16), IGNORE_INDEX, dtype=np.uint8)
    expected[2:14, 2:14] = 0  # Dermis [16, 112)^2 -> centres 20..108
    if hole:
        expected[11:13, 11:13] = IGNORE_INDEX  # hole [88, 104)^2
    expected[6:10, 6:10] = 1  # Tumor [48, 80)^2, nested: painted over the larger dermis
    expected[14, 2:14] = 0  # Epidermis row band y in [112, 120)
    return expected


LABELS = {"Dermis": 0, "Epidermis": 0, "Tumor": 1, "ROI": IGNORE_INDEX}


@pytest.mark.parametrize("style", ["qupath", "string", "name"])
def test_geojson_rasterises_to_the_expected_lookup_map(tmp_path, style):
    path = write_geojson(tmp_path / "a.geojson", [
        ("Tumor", [rectangle(48, 48, 80, 80)]),  # first in the file, yet it must stay on top
        ("Dermis", [rectangle(16, 16, 112, 112), rectangle(88, 88, 104, 104)]),
        ("Epidermis", [rectangle(16, 112, 112, 120)]),
        ("ROI", [rectangle(0, 0, 128, 128)]),  # mapped to 255: dropped, erases nothing
    ], style=style)
    annotations, lookup = load_annotations(AnnotationSource.for_file(path), LABELS, (128, 128), 8, 2, None)
    assert np.array_equal(lookup, expected_map(hole=True))
    # The exact mask of a window at another downsample: pixel centres 2 i + 1 + 40.
    window = annotations.rasterise(40, 40, 16, 16, 2)
    assert np.all(window[:4, :4] == 0) and np.all(window[4:, 4:] == 1)


def test_sliderunner_database_rasterises_to_the_expected_lookup_map(tmp_path):
    path = write_sliderunner(tmp_path / "db.sqlite", {
        "other.svs": [("Tumor", rectangle(0, 0, 128, 128)[:4])],
        "slide.svs": [
            ("Tumor", rectangle(48, 48, 80, 80)[:4]),
            ("Dermis", rectangle(16, 16, 112, 112)[:4]),
            ("Epidermis", [(16, 112), (112, 120)]),  # a rectangle annotation (two corners)
            ("Melanoma", rectangle(0, 0, 128, 128)[:4]),  # deleted
        ]}, deleted=["Melanoma"])
    source = AnnotationSource("sqlite", path, "slide.svs")
    _, lookup = load_annotations(source, LABELS, (128, 128), 8, 2, None)
    assert np.array_equal(lookup, expected_map(hole=False))


def test_label_mask_rasterises_at_any_downsample(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 1, 2, IGNORE_INDEX], dtype=np.uint8), size=(32, 32))
    Image.fromarray(mask).save(tmp_path / "slide.png")
    source = AnnotationSource.for_file(tmp_path / "slide.png")
    annotations, lookup = load_annotations(source, {}, (128, 128), 8, 3, tmp_path / "cache")  # mask at downsample 4
    assert np.array_equal(lookup, mask[1::2, 1::2])  # map pixel j is centred at 8 j + 4 = mask pixel 2 j + 1
    assert np.array_equal(annotations.rasterise(0, 0, 128, 128, 1), mask.repeat(4, 0).repeat(4, 1))
    Image.fromarray(mask[:, :16]).save(tmp_path / "narrow.png")
    with pytest.raises(ValueError, match="narrow.png.*downsample"):
        load_annotations(AnnotationSource.for_file(tmp_path / "narrow.png"), {}, (128, 128), 8, 3, None)
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="bad.png.*outside 0..2"):
        load_annotations(AnnotationSource.for_file(tmp_path / "bad.png"), {}, (128, 128), 8, 3, None)


def test_annotation_cache_is_keyed_by_content(tmp_path):
    path = write_geojson(tmp_path / "a.geojson", [("Tumor", [rectangle(48, 48, 80, 80)])])
    cache = tmp_path / "cache"
    source = AnnotationSource.for_file(path)
    first, lookup = load_annotations(source, LABELS, (128, 128), 8, 2, cache)
    again, cached = load_annotations(source, LABELS, (128, 128), 8, 2, cache)
    assert len(list(cache.glob("*.npz"))) == 1 and np.array_equal(lookup, cached)
    assert np.array_equal(first.rasterise(0, 0, 64, 64, 2), again.rasterise(0, 0, 64, 64, 2))
    write_geojson(path, [("Tumor", [rectangle(0, 0, 32, 32)])])  # edited annotations are read anew
    _, changed = load_annotations(source, LABELS, (128, 128), 8, 2, cache)
    assert changed[0, 0] == 1 and changed[7, 7] == IGNORE_INDEX
    assert len(list(cache.glob("*.npz"))) == 2


def wsi_dataset(root: Path, **kwargs) -> WSIDataset:
    args = dict(name="wsi_anno", slides_dir=str(root / "slides"), annotations_dir=str(root / "annotations"),
                label_dict={"Background": 0, "Tumor": 1}, patch_size=16, downsample=2, annotation_downsample=8,
                num_classes=2, tissue={"downsample": 8})
    csv = root / "slides.csv"
    if csv.is_file():
        args.update(csv_path=str(csv), subtype_column="subtype")
    return WSIDataset(**{**args, **kwargs})


def test_unknown_class_names_are_listed(tmp_path):
    image = tissue_image(64, 64, [(8, 8, 56, 56)])
    root = write_wsi_folder(tmp_path, {
        "a": (image, [("Tumor", [rectangle(8, 8, 40, 40)]), ("Stroma", [rectangle(8, 8, 20, 20)])]),
        "b": (image, [("Necrosis", [rectangle(8, 8, 40, 40)])]),
    }, ["a.tif,a,train,", "b.tif,b,train,"])
    with pytest.raises(ValueError, match=r"\['Necrosis', 'Stroma'\] are not in data.label_dict"):
        wsi_dataset(root)


def test_configuration_mistakes_name_what_to_change(tmp_path):
    image = tissue_image(64, 64, [(8, 8, 56, 56)])
    root = write_wsi_folder(tmp_path, {"a": (image, [("Tumor", [rectangle(8, 8, 40, 40)])])}, ["a.tif,a,train,"])
    with pytest.raises(ValueError, match=r"locations.tumour.classes must be class ids in 0..1"):
        wsi_dataset(root, locations={"tumour": {"probability": 1.0, "classes": [1, 5]}})
    with pytest.raises(ValueError, match=r"label_dict\['Tumor'\]=9"):
        wsi_dataset(root, label_dict={"Tumor": 9})
    with pytest.raises(FileNotFoundError, match="annotations_dir"):
        wsi_dataset(root, annotations_dir=str(tmp_path / "missing"))
    (root / "slides.csv").write_text("slide,case,split,subtype\nb.tif,b,train,\n")
    with pytest.raises(FileNotFoundError, match="b.tif"):
        wsi_dataset(root)


# -- tissue, sampling and splits ----------------------------------------------------------------

def test_tissue_detection_keeps_tissue_and_drops_specks():
    thumbnail = tissue_image(64, 64, [(10, 12, 50, 40)])
    thumbnail[58, 5] = (20, 20, 20)  # dust speck
    mask = detect_tissue(thumbnail, TissueParams(downsample=1, threshold=220, blur_sigma=1.0, kernel=3, min_area=16))
    assert mask[14:38, 12:48].all()  # the tissue's interior
    outside = np.ones_like(mask)
    outside[10:42, 8:52] = False
    assert not mask[outside].any()  # glass and the speck


def test_training_draws_groups_and_slides_with_the_configured_probabilities(tmp_path):
    write_catch(tmp_path)
    locations = {"background": {"probability": 0.4, "classes": [0]},
                 "tumour": {"probability": 0.5, "classes": [3, 6]},
                 "white": {"probability": 0.1, "classes": "unannotated"}}
    dataset = WSIDataset("catch_anno", str(tmp_path / "slides"), csv_path=str(tmp_path / "slides.csv"),
                         annotations_db=str(tmp_path / "CATCH.sqlite"), label_dict=CATCH_LABELS, class_train_samples=1,
                         subtype_column="subtype",
                         patch_size=8, downsample=2, locations=locations, annotation_downsample=8, num_classes=8)
    assert len(dataset.slides) == 2 and len(dataset) == 1000  # one per subtype; nominal epoch length

    def group_of(x: int, y: int) -> str:
        def inside(box):
            return box[0][0] <= x < box[2][0] and box[0][1] <= y < box[2][1]

        return "tumour" if inside(TUMOUR) else "background" if inside(DERMIS) else "white"

    torch.manual_seed(0)
    draws = [dataset.load(i).meta for i in range(800)]
    groups = Counter(group_of(m["centre_x"], m["centre_y"]) for m in draws)
    for name, probability in (("background", 0.4), ("tumour", 0.5), ("white", 0.1)):
        assert abs(groups[name] / 800 - probability) < 0.06, groups
    slides = Counter(m["slide_index"] for m in draws)
    assert abs(slides[0] / 800 - 0.5) < 0.06
    # Reproducible from torch's seed, different without it.
    torch.manual_seed(0)
    assert dataset.load(0).meta == draws[0]
    assert dataset.load(0).meta != draws[0]  # torch's RNG has moved on
    # The training mask is the exact annotation, unannotated pixels as configured.
    record = dataset.load(3)
    assert record.image.shape == (8, 8, 3) and record.mask.shape == (8, 8)


def test_evaluation_units_cover_every_annotated_pixel_once(tmp_path):
    features = [
        ("Background", [[[40, 40], [300, 60], [120, 280], [40, 40]]]),  # triangle
        ("Tumor", [rectangle(200, 200, 460, 470), rectangle(260, 260, 330, 330)]),  # with a hole
        ("Tumor", [rectangle(470, 40, 500, 120)]),  # close to the next: their grown boxes overlap
        ("Background", [rectangle(430, 100, 508, 150)]),
    ]
    image = tissue_image(512, 512, [(32, 32, 510, 480)])
    root = write_wsi_folder(tmp_path, {"v": (image, features), "t": (image, features)},
                            ["v.tif,v,val,", "t.tif,t,train,"])
    dataset = wsi_dataset(root, split="val", eval_context=4, max_unit_patches=2)
    patch, max_core = 16, 32
    totals = Counter()
    for index in range(len(dataset)):
        record = dataset.load(index)
        assert record.case == "v" and record.image.shape[:2] == record.mask.shape
        assert min(record.mask.shape) >= patch
        rows, cols = np.nonzero(record.mask != IGNORE_INDEX)
        if rows.size:
            assert np.ptp(rows) < max_core and np.ptp(cols) < max_core  # a unit's scored core is bounded
        totals.update(Counter(record.mask[record.mask != IGNORE_INDEX].tolist()))
    full = dataset.annotations[0].rasterise(0, 0, 256, 256, 2)
    assert totals == Counter(full[full != IGNORE_INDEX].tolist())
    assert totals[1] > 0 and totals[0] > 0


def test_class_train_samples_picks_slides_per_subtype(tmp_path):
    image = tissue_image(64, 64, [(8, 8, 56, 56)])
    features = [("Tumor", [rectangle(8, 8, 40, 40)])]
    slides, rows = {}, []
    for subtype in ("A", "B", "C"):
        for i in range(4):
            slides[f"{subtype}{i}"] = (image, features)
            rows.append(f"{subtype}{i}.tif,{subtype}{i},train,{subtype}")
        slides[f"{subtype}val"] = (image, features)
        rows.append(f"{subtype}val.tif,{subtype}val,val,{subtype}")
    slides["A_unannotated"] = (image, None)
    rows.append("A_unannotated.tif,A_unannotated,train,A")
    root = write_wsi_folder(tmp_path, slides, rows)

    def names(dataset):
        return sorted(s.path.stem for s in dataset.slides)

    labelled = names(wsi_dataset(root, class_train_samples=2))
    assert Counter(n[0] for n in labelled) == {"A": 2, "B": 2, "C": 2}
    assert labelled == names(wsi_dataset(root, class_train_samples=2))  # fixed by the seed
    unlabelled = names(wsi_dataset(root, role="unlabelled", class_train_samples=2))
    train = sorted(n for n in slides if "val" not in n)
    assert sorted(labelled + unlabelled) == train and "A_unannotated" in unlabelled
    assert len(names(wsi_dataset(root, class_train_samples=None))) == 12
    assert names(wsi_dataset(root, split="val")) == ["Aval", "Bval", "Cval"]


# -- slide style sources -----------------------------------------------------------------------

CRISP_TISSUE = {"downsample": 8, "blur_sigma": 0, "kernel": 1, "min_area": 1}
"""Tissue detection without blur or morphology: tissue edges on multiples of 8 stay exact."""


def position_slide(size: int = 1024, glass_from: int = 640) -> np.ndarray:
    """Tissue whose colour encodes its position (R = x / 4, G = y / 4, B = 0); glass right of ``glass_from``."""
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x // 4, y // 4, np.zeros_like(x)], axis=-1).astype(np.uint8)
    image[:, glass_from:] = 245
    return image


def test_nearby_stays_within_its_radius_and_on_tissue(tmp_path):
    root = write_wsi_folder(tmp_path, {"pos": (position_slide(), None)})
    dataset = wsi_dataset(root, role="unlabelled", val_fraction=0, test_fraction=0, tissue=CRISP_TISSUE,
                          style_source=NearbyStyle())
    target = (620, 512)  # near the glass (x >= 640): a third of the candidate square is glass
    record = Record(image=np.zeros((16, 16, 3), np.uint8), mask=None, case="pos",
                    meta={"slide_index": 0, "centre_x": target[0], "centre_y": target[1]})
    sampler, rng = NearbyStyle(relative_dist=1.0), np.random.default_rng(0)
    radius = 1.0 * 16 * 2  # relative_dist x patch_size x downsample
    offsets = []
    for _ in range(100):
        (style,) = sampler(dataset, record, record.image, rng)
        assert style.shape == (16, 16, 3)
        # Pixel (7, 7) covers level-0 [centre - 2, centre) on both axes: tissue whenever the centre is.
        red, green, blue = style[7, 7].astype(float)
        assert blue < 10
        offsets.append((4 * red + 2 - target[0], 4 * green + 2 - target[1]))
    offsets = np.array(offsets)
    assert np.abs(offsets).max() <= radius + 4  # 4 level-0 px per colour step
    assert offsets[:, 0].min() < -radius / 2 and offsets[:, 1].min() < -radius / 2 and offsets[:, 1].max() > radius / 2


def test_mp_reads_every_patch_from_the_targets_slide(tmp_path):
    other_colour = (60, 60, 170)
    slide_a = tissue_image(512, 512, [(64, 64, 448, 448)])
    slide_b = slide_a.copy()
    slide_b[64:448, 64:448] = other_colour
    root = write_wsi_folder(tmp_path, {"a": (slide_a, None), "b": (slide_b, None)})
    sampler = MultiPatchStyle(num_patches=10)
    dataset = wsi_dataset(root, role="unlabelled", val_fraction=0, test_fraction=0, tissue=CRISP_TISSUE,
                          style_source=sampler)
    for slide, colour in ((0, TISSUE_COLOUR), (1, other_colour)):
        record = Record(image=np.zeros((16, 16, 3), np.uint8), mask=None, case="x",
                        meta={"slide_index": slide, "centre_x": 256, "centre_y": 256})
        patches = sampler(dataset, record, record.image, np.random.default_rng(slide))
        assert len(patches) == 10
        other = other_colour if slide == 0 else TISSUE_COLOUR
        for patch in patches:
            pixels = patch.reshape(-1, 3).astype(float)
            assert np.linalg.norm(pixels - other, axis=1).min() > 40  # never the other slide's tissue
            centre = patch[7:9, 7:9].reshape(-1, 3).astype(float)
            assert np.linalg.norm(centre - colour, axis=1).min() < 4  # centred on this slide's tissue


# -- configs ------------------------------------------------------------------------------------

SMALL = ["data.patch_size=32", "data.downsample=2", "data.annotation_downsample=8", "data.tissue.downsample=8",
         "data.samples=8", "data.eval_overlap=8"]


def test_catch_config_with_mp_feeds_the_datamodule(compose_cfg, tmp_path):
    names = write_catch(tmp_path / "data" / "catch")
    cfg = compose_cfg("train_diff", ["data=catch", "style_sampling=mp", f"location.data_dir={tmp_path / 'data'}",
                                     *SMALL])
    assert cfg.data.locations.white == {"probability": 0.1, "classes": "unannotated"}
    assert cfg.data.label_dict["Inflamm/Necrosis"] == 0 and cfg.data.label_dict["Histiocytoma"] == 7
    datamodule = StedmDataModule(cfg.data, batch_size=2, style_source=instantiate(cfg.style_sampling.source),
                                 eval_splits=("val",))
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["style"].shape == (2, 10, 3, 32, 32) and batch["image"].shape == (2, 3, 32, 32)
    assert set(batch["meta"]["subtype"]) <= {"Melanoma", "SCC"}
    unit = next(iter(datamodule.val_dataloader()))
    assert unit["meta"]["case"][0] + ".tif" in names["val"]
    assert set(unit["mask"].unique().tolist()) <= {0, 3, 6, IGNORE_INDEX}
    assert (tmp_path / "data" / ".cache" / "wsi").is_dir()


def test_her2_config_with_geojson_and_nearby(compose_cfg, tmp_path):
    root = tmp_path / "data" / "her2"
    image = tissue_image(256, 256, [(32, 32, 224, 224)])
    features = [("Hard Negative", [rectangle(32, 32, 224, 224)]), ("HER2 2+", [rectangle(96, 96, 160, 160)])]
    write_wsi_folder(root, {f"s{i}": (image, features) for i in range(4)},
                     ["s0.tif,p0,train,2", "s1.tif,p1,train,3", "s2.tif,p2,train,3", "s3.tif,p3,val,2"],
                     header="slide,case,split,score")
    cfg = compose_cfg("train_diff", ["data=her2", "style_sampling=nearby", f"location.data_dir={tmp_path / 'data'}",
                                     "data/entries=her2_paired", *SMALL])
    assert cfg.data.locations.background.probability == 0.5 and cfg.data.downsample == 2
    datamodule = StedmDataModule(cfg.data, batch_size=2, style_source=instantiate(cfg.style_sampling.source),
                                 eval_splits=("val",))
    labelled, unlabelled = datamodule.train_sets
    assert [s.path.stem for s in labelled.slides] in (["s0", "s1"], ["s0", "s2"])  # one slide per HER2 score
    assert len(unlabelled.slides) == 1
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["style"].shape == (2, 1, 3, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {0, 3, IGNORE_INDEX}
