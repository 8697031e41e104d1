"""Training-sample throughput of one DataLoader worker on a scanner-like whole-slide image.

Writes a JPEG-compressed, tiled, pyramidal TIFF as scanners do (level 0 plus one tiled page per
reduced level, marked ``subfiletype=1``; OpenSlide's generic-TIFF reader opens it) with textured
"tissue" on glass and a QuPath-style GeoJSON of background and tumour polygons, then times the
training path of :class:`~stedm.data.wsi.WSIDataset` in one process (what one DataLoader worker
does per sample: location draw, patch read, exact mask, augmentation, style reads, tensors) for
style sampling ``none`` (1 read per sample), ``nearby`` (2) and ``mp`` (11). Locations are
random over the slide; the 16k slide's tissue at downsample 2 (about 100 MB of decoded tiles)
nearly fits the 128 MiB tile caches, so cache hits are more frequent than on real slides.

**--compare** — ``mp`` samples through the reference path (``slide_reader=openslide``: every read
through OpenSlide, as before our tile reader) against the default path (``slide_reader=auto``: the
tifffile tile reader with its decoded-tile cache) and ``slide_reader=tiffslide``, each in its own process, taking turns over
the timed repetitions so that load changes hit both alike. Figures are CPU seconds per sample
(``time.process_time``) and the peak RSS of each process. The note gives the default path
without tile cache (``tile_cache_mib=0``): the decode-bound figure of slides far larger than the cache.

    python benchmarks/wsi.py                                  # 16k x 16k, x2 pyramid, 512 px at downsample 2
    python benchmarks/wsi.py --downsample 8 --level-factor 4  # CATCH-like reads on a x4 pyramid
    python benchmarks/wsi.py --downsample 8 --level-factor 4 --size 16001  # x4.0003 levels, as in Aperio SVS
    python benchmarks/wsi.py --compare [--quick] [--workdir DIR]            # the speed table's row
    python benchmarks/wsi.py --compare --downsample 8 --level-factor 4 --size 16001
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import tifffile

from benchmarks import harness as H

TARGETS = {"none": 30.0, "nearby": 20.0, "mp": 8.0}  # samples/s per worker


def tissue_layout(size: int, seed: int = 0) -> np.ndarray:
    """A 1/64-resolution tissue map: overlapping discs covering about half the slide."""
    rng = np.random.default_rng(seed)
    low = max(8, size // 64)
    layout = np.zeros((low, low), np.uint8)
    for _ in range(12):
        x, y = rng.integers(low // 6, low - low // 6, 2)
        cv2.circle(layout, (int(x), int(y)), int(rng.integers(low // 10, low // 4)), 1, -1)
    return layout


def level_tiles(layout: np.ndarray, height: int, width: int, tile: int, rng: np.random.Generator):
    """Tiles of one level in row-major order: pink textured tissue where ``layout`` says, glass elsewhere."""
    tissue = cv2.resize(layout, (width, height), interpolation=cv2.INTER_NEAREST)
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = np.full((tile, tile, 3), 242, np.uint8)
            inside = np.zeros((tile, tile), bool)
            part = tissue[y:y + tile, x:x + tile].astype(bool)
            inside[:part.shape[0], :part.shape[1]] = part
            noise = rng.integers(-40, 40, (tile, tile, 1))
            stain = np.clip(np.array([190, 100, 170]) + noise + rng.integers(-12, 12, (tile, tile, 3)), 0, 255)
            block[inside] = stain[inside]
            yield block


def write_slide(path: Path, size: int, level_factor: int, tile: int = 256, quality: int = 85) -> None:
    layout = tissue_layout(size)
    rng = np.random.default_rng(1)
    options = dict(tile=(tile, tile), compression="jpeg", compressionargs={"level": quality}, photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        side, first = size, True
        while side >= tile:
            writer.write(level_tiles(layout, side, side, tile, rng), shape=(side, side, 3), dtype=np.uint8,
                         **({} if first else {"subfiletype": 1}), **options)
            side, first = side // level_factor, False


def write_annotations(path: Path, size: int, seed: int = 2) -> None:
    """Background polygons over the tissue discs' area and tumour polygons inside (64-gons)."""
    rng = np.random.default_rng(seed)
    features = []
    for name, count, radius in (("Background", 6, size // 6), ("Tumor", 10, size // 20)):
        for _ in range(count):
            cx, cy = rng.uniform(size * 0.2, size * 0.8, 2)
            angles = np.linspace(0, 2 * np.pi, 65)
            ring = np.c_[cx + radius * np.cos(angles), cy + radius * np.sin(angles)].tolist()
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                             "properties": {"classification": {"name": name}}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def build_dataset(root: Path, sampler_name: str, patch: int, downsample: float, **options):
    """The benchmark's labelled training set; ``options``: further WSIDataset arguments (the slide reader)."""
    from stedm.data.style_sources import MultiPatchStyle, NearbyStyle, NoStyle
    from stedm.data.transforms import train_transform
    from stedm.data.wsi import WSIDataset

    sampler = {"none": NoStyle(), "nearby": NearbyStyle(), "mp": MultiPatchStyle(10)}[sampler_name]
    return WSIDataset("bench", str(root / "slides"), annotations_dir=str(root / "annotations"),
                      label_dict={"Background": 0, "Tumor": 1}, patch_size=patch, downsample=downsample,
                      sampling={"background": {"probability": 0.5, "classes": [0]},
                                "tumour": {"probability": 0.5, "classes": [1]}},
                      unannotated_label=0, val_fraction=0, test_fraction=0, num_classes=2,
                      transform=train_transform(patch), style_source=sampler, cache_dir=str(root / "cache"),
                      **options)


@contextlib.contextmanager
def slide_folder(workdir: Path | None, size: int, level_factor: int) -> Iterator[Path]:
    """A folder with the benchmark slide (``slides/bench.tif``) and its annotations, written unless
    ``workdir`` already holds them (one subfolder per slide size and level factor)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp) / f"{size}_x{level_factor}"
        slide = root / "slides" / "bench.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        (root / "annotations").mkdir(exist_ok=True)
        if not slide.is_file():
            partial = slide.with_suffix(".partial")
            write_slide(partial, size, level_factor)
            partial.rename(slide)
        write_annotations(root / "annotations" / "bench.geojson", size)
        yield root


def start_time(root: Path, patch: int, downsample: float) -> float:
    start = time.perf_counter()
    build_dataset(root, "mp", patch, downsample)  # lookup map + tissue mask
    return time.perf_counter() - start


def measure(root: Path, sampler_name: str, patch: int, downsample: float, samples: int, warmup: int,
            **options) -> dict:
    import torch

    dataset = build_dataset(root, sampler_name, patch, downsample, **options)
    torch.manual_seed(0)
    for i in range(warmup):
        dataset[i]
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(samples):
        sample = dataset[warmup + i]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert sample["image"].shape == (3, patch, patch)
    return {"sampler": sampler_name, "reads": 1 + dataset.style_source.num_images, "per_s": samples / elapsed,
            "per_cpu_s": samples / cpu}


# -- --compare: reference path vs default path, one process each, taking turns -------------------
COMPARED = {  # path -> WSIDataset options
    "reference": {"slide_reader": "openslide"},
    "default": {"slide_reader": "auto"},
    "default, no tile cache": {"slide_reader": "auto", "tile_cache_mib": 0},
    "tiffslide": {"slide_reader": "tiffslide"},
}
DEFAULT_LABEL = "tifffile tile reader (slide_reader=auto) + 128 MiB decoded-tile cache per worker"
TIFFSLIDE_LABEL = "tiffslide (slide_reader=tiffslide: tifffile + zarr, no decoded-tile cache of ours)"
_worker_dataset = None  # the dataset of this process's path (set by _start_path in each worker)


def _start_path(root: Path, patch: int, downsample: float, options: dict, device: str, threads: int | None) -> None:
    global _worker_dataset
    H.configure_torch(device, threads)
    _worker_dataset = build_dataset(root, "mp", patch, downsample, **options)


def _run_path(first: int, samples: int) -> float:
    """CPU seconds of ``samples`` mp samples from index ``first`` (same seed and indices on every path)."""
    import torch

    torch.manual_seed(first)
    start = time.process_time()
    for i in range(first, first + samples):
        _worker_dataset[i]
    return time.process_time() - start


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def compare(device: str, threads: int | None, repeats: H.Repeats, quick: bool = False, *,
            size: int | None = None, level_factor: int = 2, downsample: float = 2.0, patch: int = 512,
            samples: int | None = None, workdir: Path | None = None) -> list[H.Comparison]:
    """The speed table's row: CPU seconds per ``mp`` training sample (512 px at downsample 2 on the 16k x2
    JPEG slide unless told otherwise), reference path (OpenSlide) against the default path (tile
    reader), each path in a fresh process; warm-up and timed repetitions of ``samples`` samples
    go round-robin over the paths (at least 5 timed ones unless ``quick``)."""
    size = size or (4096 if quick else 16384)
    samples = samples or (4 if quick else 20)
    reps = repeats.reps if quick else max(5, repeats.reps)
    with slide_folder(workdir, size, level_factor) as root:
        build_dataset(root, "mp", patch, downsample)  # lookup map and tissue mask on disk before the paths start
        context = mp.get_context("spawn")
        pools = {name: ProcessPoolExecutor(1, mp_context=context, initializer=_start_path,
                                           initargs=(root, patch, downsample, options, device, threads))
                 for name, options in COMPARED.items()}
        try:
            times: dict[str, list[float]] = {name: [] for name in pools}
            loads: dict[str, float] = {}
            for rep in range(repeats.warmup + reps):
                order = list(pools) if rep % 2 == 0 else list(pools)[::-1]
                for name in order:
                    seconds = pools[name].submit(_run_path, rep * samples, samples).result()
                    loads[name] = H.load_1min()
                    if rep >= repeats.warmup:
                        times[name].append(seconds / samples)
            peaks = {name: pool.submit(_peak_rss_mib).result() for name, pool in pools.items()}
        finally:
            for pool in pools.values():
                pool.shutdown()
    measured = {name: H.Measured(times[name], None, peaks[name], loads[name]) for name in pools}
    uncached = measured["default, no tile cache"]
    note = (f"{size} px slide, x{level_factor} levels, downsample {downsample:g}; {reps} x {samples} samples; "
            f"default without tile cache: {uncached.seconds * 1e3:.0f} ms/sample, "
            f"{measured['reference'].seconds / uncached.seconds:.2f}x")
    what = "WSI training samples, one worker, mp style sampling, 512 px JPEG tiled TIFF"
    return [H.Comparison(what=what, unit="sample", default_label=DEFAULT_LABEL, reference=measured["reference"],
                         default=measured["default"], target=2.0, note=note),
            H.Comparison(what=what, unit="sample", default_label=TIFFSLIDE_LABEL, reference=measured["reference"],
                         default=measured["tiffslide"], target=1.0,
                         note="the alternative reader: the default stays unless this row measures clearly faster "
                              "than the row above")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None, help="level-0 side of the slide in pixels (default 16384; "
                        "--compare --quick: 4096)")
    parser.add_argument("--level-factor", type=int, default=2, help="downsample between pyramid levels (2 or 4)")
    parser.add_argument("--patch", type=int, default=512)
    parser.add_argument("--downsample", type=float, default=2.0)
    parser.add_argument("--samples", type=int, default=None,
                        help="timed samples (table: default 60; --compare: per repetition, default 20, --quick 4)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up samples of the table")
    parser.add_argument("--reader", choices=["auto", "openslide", "tiffslide"], default="auto",
                        help="slide reader of the table")
    parser.add_argument("--compare", action="store_true", help="mp: reference path (OpenSlide) vs default path")
    parser.add_argument("--quick", action="store_true", help="--compare smoke run: small slide, few samples")
    parser.add_argument("--reps", type=int, default=None, help=f"--compare timed repetitions (default {H.FULL.reps})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one, as in a DataLoader worker)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the slide here, reused by later runs (default: a temp dir)")
    args = parser.parse_args()
    H.configure_torch("cpu", args.threads)

    if args.compare:
        base = H.QUICK if args.quick else H.FULL
        repeats = H.Repeats(base.warmup, args.reps or base.reps)
        started = time.perf_counter()
        comparisons = compare("cpu", args.threads, repeats, args.quick, size=args.size, level_factor=args.level_factor,
                              downsample=args.downsample, patch=args.patch, samples=args.samples,
                              workdir=args.workdir)
        print(H.comparison_table(comparisons, None, "peak RSS (MiB)"))
        print("\ntimes: CPU seconds per sample, median (min-max) of the repetitions: " + "; ".join(
            f"{name} {H.spread(m.times, 1e3, 1)} ms" for c, names in zip(comparisons, (("reference", "default"),
                                                                                     ("", "tiffslide")))
            for name, m in zip(names, (c.reference, c.default)) if name))
        print(f"total {time.perf_counter() - started:.0f} s; {H.load_average()}")
        return

    size, samples = args.size or 16384, args.samples or 60
    with slide_folder(args.workdir, size, args.level_factor) as root:
        import openslide

        handle = openslide.OpenSlide(str(root / "slides" / "bench.tif"))
        print(f"slide {size}x{size}, {(root / 'slides' / 'bench.tif').stat().st_size / 2**20:.0f} MiB JPEG, levels "
              f"{[round(d, 4) for d in handle.level_downsamples]} ({handle.properties.get('openslide.vendor')}), "
              f"read by {args.reader}")
        print(f"patch {args.patch} px at downsample {args.downsample:g}, {samples} samples after "
              f"{args.warmup} warm-up, one process")
        shutil.rmtree(root / "cache", ignore_errors=True)
        cold, warm = start_time(root, args.patch, args.downsample), start_time(root, args.patch, args.downsample)
        print(f"dataset start (lookup map + tissue mask): {cold:.2f} s cold cache, {warm:.2f} s warm")
        rows = [measure(root, name, args.patch, args.downsample, samples, args.warmup, slide_reader=args.reader)
                for name in TARGETS]
        # Wall-clock rate, and the rate per second of this process's CPU time: what one worker
        # reaches on a core of its own (the two differ when other processes share the cores).
        print(f"{'style':<8} {'reads':>5} {'samples/s':>10} {'per CPU-s':>10} {'target':>7} {'ok':>4}")
        for row in rows:
            target = TARGETS[row["sampler"]]
            print(f"{row['sampler']:<8} {row['reads']:>5} {row['per_s']:>10.1f} {row['per_cpu_s']:>10.1f} "
                  f"{target:>7.0f} {'yes' if row['per_cpu_s'] >= target else 'NO':>4}")
        print(H.load_average())


if __name__ == "__main__":
    main()
