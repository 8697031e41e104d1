"""data.cache_latents: cached latents reproduce what on-the-fly encoding feeds the denoiser
(same sample seed: same orientation, crop within the downsampling factor), KL moments are
sampled per step, the cache is keyed, bounded and counted, and unsuitable settings are refused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from stedm.data import latent_cache as L
from stedm.data.base import Record, SegmentationDataset
from stedm.data.datamodule import StedmDataModule
from stedm.data.transforms import seed_transform, train_transform
from stedm.models.first_stage import FirstStage, build_first_stage

F4 = 4


class PoolFirstStage(FirstStage):
    """A local, translation- and orientation-equivariant encoder (4x4 average pooling, scaled by a
    weight): a grid-aligned crop of its latent IS the latent of the crop, so cached and on-the-fly
    latents must agree exactly."""

    latent_channels, downsample_factor, scale_factor = 3, F4, 1.0

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(weight))
        self.freeze()

    def encode(self, x):
        return F.avg_pool2d(x, F4) * self.weight

    def decode(self, z):
        return F.interpolate(z, scale_factor=F4)


class Images(SegmentationDataset):
    def __init__(self, images, transform=None, capabilities=frozenset()):
        super().__init__("toy", "train", 2, transform)
        self.images, self.capabilities = images, capabilities

    def __len__(self):
        return len(self.images)

    def load(self, index):
        image = self.images[index]
        return Record(image, (image[..., 0] > 127).astype(np.int64), f"case{index}")


def toy_images(seed=0, shapes=((70, 90), (50, 41))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]


def source_box(ids_out: np.ndarray, width: int) -> tuple[int, int, int]:
    """(top, left, orientation) of a patch given the pixel ids it holds."""
    top, left = divmod(int(ids_out.min()), width)
    size = ids_out.shape[0]
    grid = np.arange((top + size) * width).reshape(top + size, width)[top:, left:left + size]
    op = next(o for o in range(8) if np.array_equal(L.orient(grid, o), ids_out))
    return top, left, op


def test_same_seed_same_orientation_and_crop_within_the_factor():
    image = toy_images(shapes=((70, 90),))[0]
    ids = np.arange(70 * 90, dtype=np.int32).reshape(70, 90)
    plain, cached = train_transform(32), L.LatentCropTransform(32, F4)
    seen = set()
    for seed in range(40):
        seed_transform(plain, seed)
        seed_transform(cached, seed)
        a = source_box(plain(image=image, masks=[ids])["masks"][0], 90)
        b = source_box(cached(image=image, masks=[ids])["masks"][0], 90)
        assert a[2] == b[2], "the orientation must be the same draw"
        assert b[0] % F4 == 0 and b[1] % F4 == 0
        assert 0 <= a[0] - b[0] < F4 and 0 <= a[1] - b[1] < F4
        seen.add(a[2])
    assert len(seen) == 8  # every symmetry of the square occurs


@pytest.mark.parametrize("augment", [{}, {"flips": True, "rotate90": False}, {"flips": False, "rotate90": True},
                                     {"flips": False, "rotate90": False}])
def test_cached_latents_equal_on_the_fly_latents_for_a_local_encoder(tmp_path, augment):
    stage = PoolFirstStage()
    transform = L.LatentCropTransform(32, F4, **augment)
    dataset = Images(toy_images(), transform)
    store, report = L.build_cache([dataset], transform, stage, tmp_path, limit_gib=1)
    assert report.encoded == 2 * len(transform.orientations) and report.hits == 0
    items = L.WithLatents(dataset, store)
    for index in (0, 1):  # 1 is smaller than the patch: reflect-padded
        for seed in range(12):
            torch.manual_seed(seed)
            sample = items[index]
            expected = stage.encode(sample["image"][None])[0]
            torch.testing.assert_close(sample["latent"], expected, rtol=0, atol=1e-6)
    batch = {"image": sample["image"][None], "latent": sample["latent"][None]}
    stage.encode = None  # the cached path must not encode
    torch.testing.assert_close(L.training_latents(stage, batch), sample["latent"][None])


def test_kl_first_stage_stores_moments_and_samples_every_step(tmp_path):
    stage = build_first_stage("kl", block_out_channels=[8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 3,
                              up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=4, latent_channels=2)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    stored = L.encode_for_cache(stage, x)
    posterior = stage.model.encode(x).latent_dist
    torch.testing.assert_close(stored, torch.cat([posterior.mean, posterior.logvar], dim=1))
    a, b = L.latents_from_cache(stage, stored), L.latents_from_cache(stage, stored)
    assert a.shape == posterior.mean.shape and not torch.equal(a, b)
    draws = torch.stack([L.latents_from_cache(stage, stored) for _ in range(400)])
    torch.testing.assert_close(draws.mean(0), posterior.mean * stage.scale_factor, atol=0.25, rtol=0)


def test_cache_is_keyed_by_weights_and_content_counts_hits_and_stays_bounded(tmp_path):
    transform = L.LatentCropTransform(32, F4)
    dataset = Images(toy_images(), transform)
    _, first = L.build_cache([dataset], transform, PoolFirstStage(1.0), tmp_path, 1)
    _, again = L.build_cache([dataset], transform, PoolFirstStage(1.0), tmp_path, 1)
    assert (first.hit_rate, again.hit_rate, again.encoded) == (0.0, 1.0, 0)
    _, other = L.build_cache([dataset], transform, PoolFirstStage(2.0), tmp_path, 1)
    assert other.hits == 0 and other.folder != first.folder  # other weights never reuse a latent
    changed = Images([toy_images(seed=1)[0], dataset.images[1]], transform)
    _, mixed = L.build_cache([changed], transform, PoolFirstStage(1.0), tmp_path, 1)
    assert mixed.hits == 8 and mixed.encoded == 8  # only the changed image is encoded again
    # A bound of about one run's latents evicts the older runs' least recently used ones.
    size = mixed.bytes / 2**30
    _, bounded = L.build_cache([changed], transform, PoolFirstStage(1.0), tmp_path, size * 1.01)
    assert bounded.evicted > 0
    assert sum(p.stat().st_size for p in (tmp_path / "latents").glob("*/*.npy")) <= size * 1.01 * 2**30
    with pytest.raises(ValueError, match="data.latent_cache_gib"):
        L.build_cache([changed], transform, PoolFirstStage(1.0), tmp_path, size / 4)


def test_refusals_name_the_key(tmp_path):
    transform = L.LatentCropTransform(32, F4)
    with pytest.raises(ValueError, match="data.cache_latents.*whole-slide"):
        L.build_cache([Images(toy_images(), transform, frozenset({"slide"}))], transform, PoolFirstStage(),
                      tmp_path, 1)
    with pytest.raises(ValueError, match="data.cache_latents.*identity"):
        L.build_cache([Images(toy_images(), transform)], transform, build_first_stage("identity"), tmp_path, 1)
    with pytest.raises(ValueError, match="data.augment.color_jitter=0.5"):
        L.LatentCropTransform(32, F4, color_jitter=0.5)
    with pytest.raises(ValueError, match="data.patch_size=30"):
        L.LatentCropTransform(30, F4)


def test_datamodule_batches_carry_cached_latents(compose_cfg, tmp_path):
    cfg = compose_cfg("train_diff", ["preset=tiny", "data.cache_latents=true", "data.samples=8"])
    dm = StedmDataModule(cfg.data, batch_size=4, eval_splits=(), cache_dir=tmp_path / "cache",
                         style_source=instantiate(cfg.style_sampling.source))
    stage = PoolFirstStage()
    strategy = SimpleNamespace(root_device=torch.device("cpu"), barrier=lambda name=None: None)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(first_stage=stage), strategy=strategy,
                                 global_rank=0, world_size=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent"].shape == (4, 3, 16, 16) and "style" in batch
    torch.testing.assert_close(batch["latent"], stage.encode(batch["image"]), rtol=0, atol=1e-6)
