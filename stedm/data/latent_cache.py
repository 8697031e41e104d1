"""Cached latents for a frozen first stage (``data.cache_latents=true``, diffusion training).

The first stage never trains, so each training image is encoded once, in every orientation the
augmentation can draw, and training crops the stored latent instead of encoding its patch.

What a cached sample feeds the denoiser, against the uncached path with the same sample seed:

- **Same random draws**: the augmentation is ``stedm.data.transforms.train_transform`` with its
  ``RandomCrop`` replaced by :class:`GridRandomCrop`, which takes the very same draw and rounds
  the position down to a multiple of the first stage's ``downsample_factor`` f (so it lies on
  the latent grid). The orientation is the same draw; image, mask and style images are cropped
  at the rounded position. Crop positions therefore move by less than f pixels per axis and
  lie on an f-pixel grid: a change of the crop distribution, which is why the cache is off by
  default.
- **Orientation**: a learned encoder is not flip/rotation-equivariant, so one latent is stored
  per reachable orientation of the (reflect-padded, cut to a multiple of f) image, and the crop
  is taken in the latent of the oriented image: the flip or rotation is exact.
- **Crop of a latent vs latent of a crop**: not equal. Convolutions see past the patch border,
  and the vq-f4 encoder's GroupNorm statistics and middle attention span the whole input, so
  the difference reaches inside the patch too. ``benchmarks/latent_cache.py`` measures it.
- **KL first stages**: the posterior's moments (mean, log-variance) are stored and a latent is
  sampled from them at every step (:func:`training_latents`), as on-the-fly encoding does.

The cache lives in ``<location.result_dir>/cache/latents/<first-stage fingerprint>/``, one
``.npy`` per image content (sha256 of the pixels, patch size and f) and orientation; the
fingerprint is the sha256 of the first stage's class, config and state dict, so other weights
never reuse a latent. ``data.latent_cache_gib`` bounds the folder: a run needing more is refused
before encoding; entries of other runs are evicted, least recently used first.

Whole-slide entries are refused: they read patches at continuous positions, so every training
patch is a new image and a cache would never hit.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from stedm.data.contract import image_to_tensor
from stedm.data.transforms import train_transform
from stedm.fileio import write_atomic

log = logging.getLogger(__name__)

KEY = "data.cache_latents"
LIMIT_KEY = "data.latent_cache_gib"
#: The 8 symmetries of the square as (transpose, flip rows, flip columns), applied in that order.
ORIENTATIONS: tuple[tuple[bool, bool, bool], ...] = tuple(itertools.product((False, True), repeat=3))


# -- orientations -------------------------------------------------------------------------------
def orient(array: np.ndarray, op: int) -> np.ndarray:
    """``array`` (H x W [x C]) in orientation ``op`` (an index of :data:`ORIENTATIONS`)."""
    transpose, flip_rows, flip_cols = ORIENTATIONS[op]
    if transpose:
        array = array.swapaxes(0, 1)
    if flip_rows:
        array = array[::-1]
    if flip_cols:
        array = array[:, ::-1]
    return array


def orient_point(row: int, col: int, shape: tuple[int, int], op: int) -> tuple[int, int]:
    """Where pixel ``(row, col)`` of an image of ``shape`` lands in ``orient(image, op)``."""
    transpose, flip_rows, flip_cols = ORIENTATIONS[op]
    height, width = shape
    if transpose:
        row, col, height, width = col, row, width, height
    return (height - 1 - row if flip_rows else row), (width - 1 - col if flip_cols else col)


def reachable_orientations(flips: bool = True, rotate90: bool = True) -> tuple[int, ...]:
    """The orientations ``train_transform(flips=..., rotate90=...)`` can draw."""
    def allowed(t: bool, r: bool, c: bool) -> bool:
        if flips and rotate90:
            return True
        if flips:
            return not t
        if rotate90:
            return (t + r + c) % 2 == 0  # proper rotations: an even number of reflections
        return not (t or r or c)
    return tuple(i for i, op in enumerate(ORIENTATIONS) if allowed(*op))


# -- the augmentation ---------------------------------------------------------------------------
class GridRandomCrop(A.RandomCrop):
    """``RandomCrop`` with the same random draw, its position rounded down to a multiple of
    ``step`` (and kept inside the image cut to a multiple of ``step``)."""

    def __init__(self, height: int, width: int, step: int = 1) -> None:
        super().__init__(height=height, width=width, p=1.0)
        self.step = int(step)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        out = super().get_params_dependent_on_data(params, data)
        height, width = params["shape"][:2]
        s = self.step
        x0, y0 = out["crop_coords"][:2]
        x0 = min(x0 // s * s, width // s * s - self.width)
        y0 = min(y0 // s * s, height // s * s - self.height)
        out["crop_coords"] = (x0, y0, x0 + self.width, y0 + self.height)
        return out


@dataclass(frozen=True)
class LatentCrop:
    """Where a training patch lies in the cache: image ``key``, orientation ``op``, top-left latent cell."""

    key: str
    op: int
    row: int
    col: int


def content_key(image: np.ndarray, patch_size: int, factor: int) -> str:
    digest = hashlib.sha256(f"{image.shape}|{image.dtype}|p{patch_size}|f{factor}|".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:32]


@lru_cache(maxsize=8)
def _pixel_ids(height: int, width: int) -> np.ndarray:
    ids = np.arange(height * width, dtype=np.int32).reshape(height, width)
    ids.setflags(write=False)
    return ids


class LatentCropTransform:
    """The training augmentation of a cached run: ``train_transform`` with a :class:`GridRandomCrop`;
    after each call, :attr:`last` says where the patch lies in the cache.

    The image is reflect-padded first (by a copy of the pipeline's own ``PadIfNeeded``; it draws
    nothing, so the pipeline's draws are unchanged), then a map of pixel ids travels through the
    pipeline as an extra mask: where the ids land tells the crop position and the orientation,
    whichever flip/rotation steps the pipeline has.
    """

    def __init__(self, patch_size: int, factor: int, flips: bool = True, rotate90: bool = True,
                 **photometric: float) -> None:
        active = {k: v for k, v in photometric.items() if v}
        if active:
            raise ValueError(f"{KEY}=true: the cache stores latents of unchanged pixels and cannot reproduce "
                             f"photometric augmentation ({', '.join(f'data.augment.{k}={v}' for k, v in active.items())}); "
                             f"set them to 0 or {KEY}=false")
        if patch_size % factor:
            raise ValueError(f"{KEY}=true: data.patch_size={patch_size} is not a multiple of the first stage's "
                             f"downsampling factor {factor}; choose a multiple or {KEY}=false")
        base = train_transform(patch_size, flips=flips, rotate90=rotate90)
        self.pad = copy.deepcopy(base.transforms[0])
        steps = [GridRandomCrop(patch_size, patch_size, factor) if isinstance(s, A.RandomCrop) else s
                 for s in base.transforms]
        self.compose = A.Compose(steps)
        self.patch_size, self.factor = int(patch_size), int(factor)
        self.orientations = reachable_orientations(flips, rotate90)
        self.last: LatentCrop | None = None

    def set_random_state(self, np_rng: np.random.Generator, py_rng: Any) -> None:
        self.compose.set_random_state(np_rng, py_rng)

    def grid_image(self, image: np.ndarray) -> np.ndarray:
        """The image the cache encodes: reflect-padded to the patch size, cut to a multiple of f."""
        padded = self.pad(image=image)["image"]
        f = self.factor
        return padded[: padded.shape[0] // f * f, : padded.shape[1] // f * f]

    def __call__(self, image: np.ndarray, masks: list[np.ndarray] | None = None) -> dict[str, Any]:
        key = content_key(image, self.patch_size, self.factor)
        padded = self.pad(image=image, masks=list(masks or []))
        height, width = padded["image"].shape[:2]
        ids = _pixel_ids(height, width)
        out = self.compose(image=padded["image"], masks=[*padded["masks"], ids])
        self.last = self._locate(key, out["masks"][-1], ids)
        result = {"image": out["image"]}
        if masks:
            result["masks"] = list(out["masks"][:-1])
        return result

    def _locate(self, key: str, where: np.ndarray, ids: np.ndarray) -> LatentCrop:
        width, p, f = ids.shape[1], self.patch_size, self.factor
        row, col = divmod(int(where.min()), width)  # the source box's top-left pixel
        box = ids[row:row + p, col:col + p]
        op = next((o for o in range(len(ORIENTATIONS)) if np.array_equal(orient(box, o), where)), None)
        if op is None:
            raise RuntimeError(f"{KEY}=true: the augmentation did more than crop, flip and rotate; "
                               f"set {KEY}=false")
        grid = (ids.shape[0] // f * f, width // f * f)
        top, left = orient_point(*divmod(int(where[0, 0]), width), grid, op)
        if top % f or left % f:
            raise RuntimeError(f"patch at ({top}, {left}) off the latent grid of factor {f}")
        return LatentCrop(key, op, top // f, left // f)


# -- first stage --------------------------------------------------------------------------------
def is_kl(first_stage: Any) -> bool:
    from diffusers import AutoencoderKL

    return isinstance(getattr(first_stage, "model", None), AutoencoderKL)


@torch.no_grad()
def encode_for_cache(first_stage: Any, x: Tensor) -> Tensor:
    """What the cache stores for images ``x``: the latent (VQ, already scaled), or the KL
    posterior's mean and log-variance concatenated on the channel axis."""
    if is_kl(first_stage):
        posterior = first_stage.model.encode(x).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1)
    return first_stage.encode(x)


def latents_from_cache(first_stage: Any, stored: Tensor) -> Tensor:
    """Training latents from stored values: KL samples the posterior anew (each step), VQ as is."""
    if is_kl(first_stage):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(stored).sample() * first_stage.scale_factor
    return stored


def training_latents(first_stage: Any, batch: dict[str, Any]) -> Tensor:
    """The latents a training step diffuses: from the cache when the batch carries them
    (``data.cache_latents``), otherwise the batch's images encoded now."""
    with torch.no_grad():
        if "latent" in batch:
            return latents_from_cache(first_stage, batch["latent"])
        return first_stage.encode(batch["image"])


def fingerprint(first_stage: torch.nn.Module) -> str:
    """sha256 of the first stage's class, config and state dict (names, dtypes, shapes, values)."""
    digest = hashlib.sha256(type(first_stage).__name__.encode())
    model = getattr(first_stage, "model", first_stage)
    digest.update(repr(sorted(dict(getattr(model, "config", {})).items())).encode())
    for name, tensor in first_stage.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- the store ----------------------------------------------------------------------------------
class LatentStore:
    """One ``.npy`` (C x h x w float32) per image content and orientation, in ``folder``."""

    def __init__(self, folder: Path, patch_size: int, factor: int) -> None:
        self.folder, self.size = Path(folder), int(patch_size) // int(factor)

    def path(self, key: str, op: int) -> Path:
        return self.folder / f"{key}-o{op}.npy"

    def write(self, key: str, op: int, latent: np.ndarray) -> None:
        # atomic: concurrent builders (DDP ranks) never see half a file
        write_atomic(self.path(key, op), lambda fh: np.save(fh, np.ascontiguousarray(latent, dtype=np.float32)))

    def crop(self, where: LatentCrop) -> Tensor:
        path = self.path(where.key, where.op)
        try:
            latent = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{KEY}=true: {path} is missing: a training image is not the one the cache was built from "
                f"(its dataset's images changed during the run, or its loading is random); set {KEY}=false") from None
        s = self.size
        return torch.from_numpy(np.array(latent[:, where.row:where.row + s, where.col:where.col + s]))


class WithLatents(Dataset):
    """A training dataset whose samples also carry ``latent``: their patch's cached latent."""

    def __init__(self, dataset: Any, store: LatentStore) -> None:
        self.dataset, self.store = dataset, store

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        transform = self.dataset.transform
        transform.last = None
        sample = self.dataset[index]
        if transform.last is None:
            raise RuntimeError(f"{KEY}=true: dataset '{self.dataset.name}' did not augment its item {index}")
        sample["latent"] = self.store.crop(transform.last)
        return sample


@dataclass
class CacheReport:
    images: int
    latents: int
    hits: int
    encoded: int
    seconds: float
    bytes: int
    evicted: int
    folder: Path

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.latents, 1)

    def __str__(self) -> str:
        return (f"latent cache {self.folder}: {self.images} images, {self.latents} latents (images x orientations): "
                f"{self.hits} found ({100 * self.hit_rate:.0f} % hits), {self.encoded} encoded in {self.seconds:.1f} s; "
                f"{self.bytes / 2**20:.1f} MiB" + (f"; evicted {self.evicted} old entries" if self.evicted else ""))


def check_cacheable(datasets: list[Any], first_stage: Any) -> None:
    if getattr(first_stage, "downsample_factor", 1) == 1 and not hasattr(first_stage, "model"):
        raise ValueError(f"{KEY}=true, but the first stage is the identity (pixel-space diffusion): there is "
                         f"nothing to encode; set {KEY}=false")
    for dataset in datasets:
        if "slide" in getattr(dataset, "capabilities", ()):
            raise ValueError(
                f"{KEY}=true: entry '{dataset.name}' reads whole-slide patches at continuous positions, so every "
                f"training patch is a new image and a latent cache would never hit (0 % hits, only disk "
                f"writes); set {KEY}=false")


def build_cache(datasets: list[Any], transform: LatentCropTransform, first_stage: Any, cache_dir: Path,
                limit_gib: float, device: torch.device | str = "cpu") -> tuple[LatentStore, CacheReport]:
    """Encode every training image of ``datasets`` in each orientation ``transform`` can draw
    (skipping those already stored), bound the cache folder, return the store and what it did."""
    check_cacheable(datasets, first_stage)
    if not limit_gib or limit_gib <= 0:
        raise ValueError(f"{LIMIT_KEY}={limit_gib} must be a positive size in GiB")
    limit = int(float(limit_gib) * 2**30)
    root = Path(cache_dir) / "latents"
    store = LatentStore(root / fingerprint(first_stage)[:24], transform.patch_size, transform.factor)
    store.folder.mkdir(parents=True, exist_ok=True)
    first_stage = first_stage.to(device)
    channels = first_stage.latent_channels * (2 if is_kl(first_stage) else 1)
    f = transform.factor
    seen: set[str] = set()
    used: set[Path] = set()
    hits = encoded = needed = 0
    start = time.perf_counter()
    for dataset in datasets:
        for index in range(len(dataset)):
            image = dataset.load(index).image
            key = content_key(image, transform.patch_size, f)
            if key in seen:
                continue
            seen.add(key)
            grid = transform.grid_image(image)
            needed += len(transform.orientations) * channels * (grid.shape[0] // f) * (grid.shape[1] // f) * 4
            if needed > limit:
                raise ValueError(f"{KEY}=true: the latents of the training images need more than {LIMIT_KEY}="
                                 f"{limit_gib} GiB (so far {needed / 2**30:.2f} GiB at image {index} of entry "
                                 f"'{dataset.name}'); raise {LIMIT_KEY} or set {KEY}=false")
            for op in transform.orientations:
                path = store.path(key, op)
                used.add(path)
                if path.exists():
                    hits += 1
                    os.utime(path)  # recently used: evicted last
                    continue
                x = image_to_tensor(np.ascontiguousarray(orient(grid, op)))[None].to(device)
                store.write(key, op, encode_for_cache(first_stage, x)[0].float().cpu().numpy())
                encoded += 1
    seconds = time.perf_counter() - start
    evicted = evict(root, used, limit)
    report = CacheReport(len(seen), len(used), hits, encoded, seconds, sum(p.stat().st_size for p in used),
                         evicted, store.folder)
    log.info("%s", report)
    return store, report


def evict(root: Path, keep: set[Path], limit: int) -> int:
    """Remove the least recently used cache files outside ``keep`` until ``root`` holds at most
    ``limit`` bytes; returns how many were removed."""
    files = [(p.stat().st_mtime, p.stat().st_size, p) for p in root.glob("*/*.npy")]
    total = sum(size for _, size, _ in files)
    removed = 0
    for _, size, path in sorted(files):
        if total <= limit:
            break
        if path in keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        removed += 1
    if removed:
        log.info("latent cache: evicted %d least recently used latents to stay within %s=%.2f GiB",
                 removed, LIMIT_KEY, limit / 2**30)
    return removed


def attach(datamodule: Any, trainer: Any) -> CacheReport:
    """Build the cache for ``datamodule``'s training sets with the trainer's module's first stage
    on the trainer's device (rank 0 first, then the others, which find it built) and switch the
    training sets to the cached augmentation."""
    data = datamodule.data
    if datamodule.cache_dir is None:
        raise ValueError(f"{KEY}=true needs a cache folder (<location.result_dir>/cache); none was given")
    first_stage = trainer.lightning_module.first_stage
    augment = dict(data.get("augment") or {})
    transform = LatentCropTransform(int(data.patch_size), int(first_stage.downsample_factor), **augment)
    strategy = trainer.strategy
    if trainer.global_rank != 0:
        strategy.barrier("latent_cache")
    store, report = build_cache(datamodule.train_sets, transform, first_stage, datamodule.cache_dir,
                                float(data.get("latent_cache_gib") or 0), strategy.root_device)
    if trainer.global_rank == 0:
        strategy.barrier("latent_cache")
    for dataset in datamodule.train_sets:
        dataset.transform = transform
    datamodule.latent_store = store
    return report
