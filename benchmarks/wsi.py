"""Training-sample throughput of one DataLoader worker on a scanner-like whole-slide image.

Writes a JPEG-compressed, tiled, pyramidal TIFF as scanners do (level 0 plus one tiled page per
reduced level, marked ``subfiletype=1``; OpenSlide's generic-TIFF reader opens it) with textured
"tissue" on glass and a QuPath-style GeoJSON of background and tumour polygons, then times the
training path of :class:`~stedm.data.wsi.WSIDataset` in one process (what one DataLoader worker
does per sample: location draw, patch read, exact mask, augmentation, style reads, tensors) for
style sampling ``none`` (1 read per sample), ``nearby`` (2) and ``mp`` (11). Locations are
random over the slide, so OpenSlide's tile cache helps only as much as it would in training.

    python benchmarks/wsi.py                                  # 16k x 16k, x2 pyramid, 512 px at downsample 2
    python benchmarks/wsi.py --downsample 8 --level-factor 4  # CATCH-like reads on a x4 pyramid
    python benchmarks/wsi.py --downsample 8 --level-factor 4 --size 16001  # x4.0003 levels, as in Aperio SVS
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile

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


def build_dataset(root: Path, sampler_name: str, patch: int, downsample: float):
    from stedm.data.style import MultiPatchStyle, NearbyStyle, NoStyle
    from stedm.data.transforms import train_transform
    from stedm.data.wsi import WSIDataset

    sampler = {"none": NoStyle(), "nearby": NearbyStyle(), "mp": MultiPatchStyle(10)}[sampler_name]
    return WSIDataset("bench", str(root / "slides"), annotations_dir=str(root / "annotations"),
                      label_dict={"Background": 0, "Tumor": 1}, patch_size=patch, downsample=downsample,
                      sampling={"background": {"probability": 0.5, "classes": [0]},
                                "tumour": {"probability": 0.5, "classes": [1]}},
                      unannotated_label=0, val_fraction=0, test_fraction=0, num_classes=2,
                      transform=train_transform(patch), style_sampler=sampler, cache_dir=str(root / "cache"))


def start_time(root: Path, patch: int, downsample: float) -> float:
    start = time.perf_counter()
    build_dataset(root, "mp", patch, downsample)  # lookup map + tissue mask
    return time.perf_counter() - start


def measure(root: Path, sampler_name: str, patch: int, downsample: float, samples: int, warmup: int) -> dict:
    import torch

    dataset = build_dataset(root, sampler_name, patch, downsample)
    torch.manual_seed(0)
    for i in range(warmup):
        dataset[i]
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(samples):
        sample = dataset[warmup + i]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert sample["image"].shape == (3, patch, patch)
    return {"sampler": sampler_name, "reads": 1 + dataset.style_sampler.num_images, "per_s": samples / elapsed,
            "per_cpu_s": samples / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384, help="level-0 side of the slide in pixels")
    parser.add_argument("--level-factor", type=int, default=2, help="downsample between pyramid levels (2 or 4)")
    parser.add_argument("--patch", type=int, default=512)
    parser.add_argument("--downsample", type=float, default=2.0)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the slide here, reused by later runs (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        slide = root / "slides" / "bench.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        (root / "annotations").mkdir(exist_ok=True)
        start = time.perf_counter()
        if not slide.is_file():
            write_slide(slide, args.size, args.level_factor)
        write_annotations(root / "annotations" / "bench.geojson", args.size)
        import openslide

        handle = openslide.OpenSlide(str(slide))
        print(f"slide {args.size}x{args.size}, {slide.stat().st_size / 2**20:.0f} MiB JPEG, levels "
              f"{[round(d) for d in handle.level_downsamples]} ({handle.properties.get('openslide.vendor')}); "
              f"written in {time.perf_counter() - start:.1f} s")
        print(f"patch {args.patch} px at downsample {args.downsample:g}, {args.samples} samples after "
              f"{args.warmup} warm-up, one process")
        import torch

        torch.set_num_threads(1)  # as in a DataLoader worker
        shutil.rmtree(root / "cache", ignore_errors=True)
        cold, warm = start_time(root, args.patch, args.downsample), start_time(root, args.patch, args.downsample)
        print(f"dataset start (lookup map + tissue mask): {cold:.2f} s cold cache, {warm:.2f} s warm")
        rows = [measure(root, name, args.patch, args.downsample, args.samples, args.warmup) for name in TARGETS]
        # Wall-clock rate, and the rate per second of this process's CPU time: what one worker
        # reaches on a core of its own (the two differ when other processes share the cores).
        print(f"{'style':<8} {'reads':>5} {'samples/s':>10} {'per CPU-s':>10} {'target':>7} {'ok':>4}")
        for row in rows:
            target = TARGETS[row["sampler"]]
            print(f"{row['sampler']:<8} {row['reads']:>5} {row['per_s']:>10.1f} {row['per_cpu_s']:>10.1f} "
                  f"{target:>7.0f} {'yes' if row['per_cpu_s'] >= target else 'NO':>4}")


if __name__ == "__main__":
    main()
