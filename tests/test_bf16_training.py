"""bf16-mixed training with its speed levers trains the same as fp32 (issue 20).

``location.precision=bf16-mixed`` turns on what makes bf16 steps faster (``location.channels_last=auto``:
channels-last activations into the networks); fp32 runs keep NCHW and stay as they were. Over 20
steps of the tiny presets from the same seed, the bf16 loss curve stays within 2 % (mean relative
difference) of the fp32 one, for the STEDM and the GenSelfDiff pretraining step. Both runs take
the real training path: the module as the entry script builds it, a Lightning ``Trainer`` with the
resolved precision, ``configure_optimizers`` and the module's ``optimizer_step`` with its EMA.

Tiny on purpose (32 px, batch 2): on CPUs without AVX512-BF16/AMX bf16 is emulated and far slower.
"""

from __future__ import annotations

import pytorch_lightning as pl
import pytest
import torch
from torch.utils.data import DataLoader

from stedm.run import apply_channels_last, batch_size, learning_rate, resolve_precision, uses_channels_last

STEPS, BATCH, SIZE = 20, 2, 32
BF16, FP32 = "bf16-mixed", "32-true"


class LossRecorder(pl.Callback):
    """The training loss of every step, and the memory format of the networks' first convolution input."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.losses: list[float] = []
        self.channels_last_inputs: list[bool] = []
        first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_pre_hook(self._record_format)

    def _record_format(self, module, args) -> None:
        self.channels_last_inputs.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                         and not args[0].is_contiguous())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _batches(style_images: int | None) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    batches = []
    for i in range(STEPS):
        disc = ((yy - SIZE / 2) ** 2 + (xx - (8 + i % 8)) ** 2 < (SIZE / 4) ** 2).long()
        batch = {"image": torch.rand(BATCH, 3, SIZE, SIZE, generator=generator) * 2 - 1,
                 "mask": disc.expand(BATCH, -1, -1).clone()}
        if style_images:
            batch["style"] = torch.rand(BATCH, style_images, 3, SIZE, SIZE, generator=generator) * 2 - 1
        batches.append(batch)
    return batches


def _stedm(cfg):
    from stedm.tasks.diffusion import build_model, model_config

    module = build_model(model_config(cfg), learning_rate(cfg, batch_size(cfg), 1))
    return module, module.denoiser, _batches(int(cfg.style_sampling.num_images))


def _genselfdiff(cfg):
    from hydra.utils import instantiate

    module = instantiate(cfg.model, lr=learning_rate(cfg, batch_size(cfg), 1))
    return module, module.net, _batches(None)


TASKS = {"train_diff": (_stedm, ("diffusion.sample_every_n_steps=0",)),
         "pretrain_ssl": (_genselfdiff, ("model.sample_every_n_epochs=0",))}


def _train(compose_cfg, tmp_path, task: str, precision: str) -> tuple[list[float], LossRecorder, bool]:
    build, overrides = TASKS[task]
    cfg = compose_cfg(task, ["preset=tiny", "location=local", "location.accelerator=cpu",
                             f"location.precision={precision}", *overrides])
    resolved = resolve_precision(cfg.location)
    pl.seed_everything(0)
    module, network, batches = build(cfg)
    module = apply_channels_last(cfg, module, resolved)
    recorder = LossRecorder(network)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=resolved, max_steps=STEPS, max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=str(tmp_path / precision), callbacks=[recorder])
    pl.seed_everything(0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return recorder.losses, recorder, module.channels_last


@pytest.mark.parametrize("task", list(TASKS))
def test_bf16_levers_train_like_fp32(compose_cfg, tmp_path, task):
    fp32, fp32_rec, fp32_cl = _train(compose_cfg, tmp_path, task, FP32)
    bf16, bf16_rec, bf16_cl = _train(compose_cfg, tmp_path, task, BF16)
    # the levers are on under bf16 only: fp32 runs stay NCHW, as before issue 20
    assert not fp32_cl and not any(fp32_rec.channels_last_inputs)
    assert bf16_cl and all(bf16_rec.channels_last_inputs) and bf16_rec.channels_last_inputs
    assert len(fp32) == len(bf16) == STEPS
    assert all(torch.isfinite(torch.tensor(bf16)))
    relative = [abs(b - f) / abs(f) for b, f in zip(bf16, fp32, strict=True)]
    mean = sum(relative) / len(relative)
    assert mean < 0.02, f"bf16 loss curve differs from fp32 by {100 * mean:.2f} % on average (per step: {relative})"
    # and it is a real bf16 run: the curves are not bit-identical
    assert bf16 != fp32


def test_channels_last_setting(compose_cfg):
    cfg = compose_cfg("pretrain_ssl", ["preset=tiny", "location=local"])
    assert cfg.location.channels_last == "auto"
    assert uses_channels_last(cfg.location, BF16) and not uses_channels_last(cfg.location, FP32)
    cfg.location.channels_last = False
    assert not uses_channels_last(cfg.location, BF16)
    cfg.location.channels_last = "yes"
    with pytest.raises(ValueError, match="location.channels_last='yes'; choose auto, true or false"):
        uses_channels_last(cfg.location, BF16)
    cfg.location.channels_last = True

    class NoChannelsLast(pl.LightningModule):
        pass

    with pytest.raises(ValueError, match="location.channels_last=true, but NoChannelsLast has no channels-last"):
        apply_channels_last(cfg, NoChannelsLast(), BF16)
