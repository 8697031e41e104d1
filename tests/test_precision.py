"""Precision on any machine: what ``location.precision=auto`` resolves to on each kind of hardware
(the capability checks simulated both ways), and the bf16-mixed code paths forced on every CPU
(emulated where the CPU lacks AVX512-BF16 / AMX, so the shapes stay tiny): a segmenter step, a
StyleDiffusion step and sampling call, and an SSL pretraining step agree with fp32 to bf16
precision and really ran in bf16."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import stedm.run
from conftest import compose_in
from stedm.losses.segmentation import SegmentationLoss
from stedm.models.ssl_unet import build_ssl_unet
from stedm.modules.segmentation import Segmenter
from stedm.modules.ssl_pretrain import SSLPretrainer
from stedm.run import resolve_precision
from test_fast_paths import SIZE, batches, style_diffusion
from test_segmenter import Shapes, tiny_unet

# bf16 keeps 8 bits of mantissa: a loss after a few steps agrees with fp32 to about a percent
BF16_TOLERANCE = {"rtol": 0.03, "atol": 0.01}


# -- what auto picks ----------------------------------------------------------------------------
@pytest.mark.parametrize("cuda,cuda_bf16,cpu_bf16,expected", [
    (True, True, False, "bf16-mixed"),     # CUDA with bf16 (Ampere and newer)
    (True, False, True, "16-mixed"),       # older CUDA GPUs: fp16 with loss scaling; the CPU does not matter
    (False, False, True, "bf16-mixed"),    # CPU with AMX / AVX512-BF16
    (False, False, False, "32-true"),      # any other CPU: emulated bf16 would be ~50x slower
])
def test_auto_precision_follows_the_hardware(tmp_path, monkeypatch, cuda, cuda_bf16, cpu_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(stedm.run, "cpu_has_fast_bf16", lambda: cpu_bf16)
    location = compose_in(tmp_path, "train_seg", ["location.precision=auto"]).location
    assert location.accelerator == "auto" and resolve_precision(location) == expected
    for forced in ("32-true", "bf16-mixed"):  # an explicit choice is kept on any hardware
        assert resolve_precision(compose_in(tmp_path, "train_seg", [f"location.precision={forced}"]).location) == forced


@pytest.mark.parametrize("amx,avx512_bf16,fast", [(False, False, False), (False, True, True), (True, False, True)])
def test_cpu_bf16_check_reads_torchs_capability_flags(monkeypatch, amx, avx512_bf16, fast):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert stedm.run.cpu_has_fast_bf16() is fast
    location = OmegaConf.create({"accelerator": "auto", "precision": "auto"})
    assert resolve_precision(location) == ("bf16-mixed" if fast else "32-true")


# -- bf16-mixed forced, on every CPU -------------------------------------------------------------
class Recorder(pl.Callback):
    """The loss of every step, and the dtype of the network's output (what autocast ran in)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer, module) -> None:
        net = module.net if hasattr(module, "net") else module.denoiser
        net.register_forward_hook(lambda _m, _i, out: self.dtypes.add(getattr(out, "sample", out).dtype))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def training_run(precision: str, build, data, root, steps: int = 3) -> Recorder:
    """``steps`` Lightning training steps of ``build()`` on ``data`` at ``precision``, from the same seed."""
    pl.seed_everything(0)
    recorder = Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root, callbacks=[recorder])
    trainer.fit(build(), data)
    assert len(recorder.losses) == steps
    return recorder


def assert_bf16_agrees_with_fp32(build, data, root) -> None:
    fp32, bf16 = (training_run(p, build, data, root) for p in ("32-true", "bf16-mixed"))
    assert all(torch.isfinite(torch.tensor(r.losses)).all() for r in (fp32, bf16))
    torch.testing.assert_close(torch.tensor(bf16.losses), torch.tensor(fp32.losses), **BF16_TOLERANCE)
    assert fp32.dtypes == {torch.float32} and torch.bfloat16 in bf16.dtypes  # bf16 really ran
    assert fp32.losses != bf16.losses


def test_segmenter_step_under_bf16_mixed_matches_fp32(tmp_path):
    def build():
        torch.manual_seed(0)
        return Segmenter(net=tiny_unet(), loss=SegmentationLoss(), lr=1e-3, num_classes=2, class_names=["bg", "fg"],
                         window=32, overlap=8, border_crop=2, binary=True, output_dir=str(tmp_path),
                         optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.0))

    assert_bf16_agrees_with_fp32(build, DataLoader(Shapes(4, 32, 32, seed=1), batch_size=2), tmp_path)


def test_style_diffusion_step_under_bf16_mixed_matches_fp32(tmp_path):
    assert_bf16_agrees_with_fp32(style_diffusion, DataLoader(batches(), batch_size=None), tmp_path)


def test_ssl_pretraining_step_under_bf16_mixed_matches_fp32(tmp_path):
    def build():
        torch.manual_seed(0)
        return SSLPretrainer(build_ssl_unet("tiny"), lr=1e-3, sample_every_n_epochs=0,
                             optimizer=functools.partial(torch.optim.Adam))

    images = [{"image": b["image"]} for b in batches()]
    assert_bf16_agrees_with_fp32(build, DataLoader(images, batch_size=None), tmp_path)


def test_style_diffusion_sampling_under_bf16_autocast_matches_fp32():
    """predict_diff's bf16 path: ``generate`` inside a bf16 autocast region (stedm/tasks/predict.py)."""
    model = style_diffusion().eval()
    batch = batches(1)[0]
    kwargs = {"seed": 3, "solver": "dpm_solver", "steps": 3, "cfg_scale": 1.5}
    fp32 = model.generate(batch["mask"], batch["style"], **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.generate(batch["mask"], batch["style"], **kwargs)
    assert bf16.dtype == fp32.dtype == torch.float32 and bf16.shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(bf16).all() and bf16.min() >= -1 and bf16.max() <= 1
    assert not torch.equal(bf16, fp32)  # the bf16 path really ran
    # an untrained model saturates most pixels; the few near the clamp edge may flip, the rest agree
    difference = (bf16 - fp32).abs()
    assert difference.mean() <= 0.01 and (difference > 2 / 255).float().mean() <= 0.05


# -- STEDM_TEST_PRECISION -------------------------------------------------------------------------
@pytest.mark.e2e
def test_the_forced_precision_reaches_e2e_configs_after_their_own_pin(tmp_path):
    import os

    from conftest import PRECISION_ENV, forced_precision

    forced = os.environ.get(PRECISION_ENV)
    cfg = compose_in(tmp_path, "train_seg", ["location.precision=32-true"])
    assert forced_precision() == ([f"location.precision={forced}"] if forced else [])
    assert cfg.location.precision == (forced or "32-true")


def test_the_forced_precision_leaves_other_tests_alone(tmp_path, monkeypatch):
    from conftest import PRECISION_ENV, forced_precision

    monkeypatch.setenv(PRECISION_ENV, "bf16-mixed")
    assert forced_precision() == []  # the env var is read per e2e test (tests/conftest.py)
    assert compose_in(tmp_path, "train_seg", ["location.precision=32-true"]).location.precision == "32-true"
