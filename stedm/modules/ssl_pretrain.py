"""SSL pretraining of GenSelfDiff-HIS (docs/method.md, 2 GenSelfDiff-HIS): train the U-Net as a DDPM denoiser on unlabelled images.

Uses only ``batch["image"]`` (contract range ``[-1, 1]``), so labelled and unlabelled entries
both feed it; random flips come from the data transforms. The loss is the λ_t-weighted MSE of
the prediction (ε by default, P2 weighting by default), averaged over pixels and over the batch
(the original summed over the batch, which tied the effective learning rate to the batch size).
The schedule comes from :mod:`stedm.diffusion.schedules`, the loss and its weights from
:mod:`stedm.losses.diffusion`, the EMA from :mod:`stedm.modules.ema`, the solver of the sample
grid from :mod:`stedm.diffusion.solvers`.

Outputs written into ``trainer.default_root_dir`` (global rank zero only):

- ``pretrained_unet.pt``: the denoiser's constructor arguments and both weight sets, the EMA
  and the live weights, rewritten at every checkpoint and at the end of fit;
  :func:`stedm.models.ssl_unet.build_ssl_segmenter` reads it (``pretrained_weights`` chooses);
  ``pretrained_unet.safetensors`` holds the same with a model card (either is a ``pretrained``);
- ``final.safetensors`` (:class:`stedm.callbacks.ExportWeights`, at the end of a finished fit):
  the module's weights with the EMA in place of the denoiser's live ones (card: ``weights_set: ema``);
- ``samples/epoch_XXX.png`` every ``sample_every_n_epochs`` epochs: one row per sample, columns
  from pure noise (left) to the final image (right) of a trajectory of the EMA model, always
  from the same noise so that epochs compare.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from torchvision.utils import make_grid

from stedm.data.contract import tensor_to_image
from stedm.diffusion.options import SamplingOptions
from stedm.diffusion.schedules import SCHEDULES, make_scheduler, to_epsilon
from stedm.diffusion.solvers import noise_for_indices, sample
from stedm.losses.diffusion import DiffusionLoss, LossWeighting
from stedm.models.ssl_unet import save_pretrained_unet, set_attention
from stedm.modules.ema import ParameterEMA
from stedm.run import channels_last_input

PRETRAINED_FILENAME = "pretrained_unet.pt"
PRETRAINED_SAFETENSORS = "pretrained_unet.safetensors"  # the same two weight sets, with a model card


class SSLPretrainer(pl.LightningModule):
    """Diffusion pretraining of an :class:`~stedm.models.ssl_unet.SSLUNet` (``net``).

    ``optimizer`` is a partial optimizer constructor (Hydra ``_partial_: true``) called as
    ``optimizer(params, lr=lr)``; ``None`` means Adam. ``noise_schedule`` (the shape both
    diffusion modules take) defaults to the paper's T = 1000 "quadratic" betas
    (``SCHEDULES["genselfdiff"]``, diffusers ``scaled_linear``). ``weighting`` is ``p2``
    (``1/(p2_k + SNR)^p2_gamma``), ``min_snr`` (γ = ``min_snr_gamma``) or ``none``. The sample
    grid runs ``sampling`` (a :class:`~stedm.diffusion.options.SamplingOptions` or its mapping;
    its ``solver`` and ``steps``: ``ddpm`` = ancestral DDPM, the paper's, with 1000 steps;
    ``ddim``; ``dpm_solver``) without x0 clipping (as the original) and shows ``sample_frames``
    snapshots per trajectory; ``sample_every_n_epochs=0`` disables it.

    How the step computes, without changing what it computes (loss and gradients agree up to float
    rounding): ``attention`` picks the full attention's kernel (``sdpa``: torch's fused one;
    ``explicit``: the materialised softmax of the original), ``ema_foreach`` updates the EMA with
    multi-tensor ops instead of a Python loop over the parameters. ``attention="explicit",
    ema_foreach=False`` with torch's default (for-loop) Adam is the original's way: the reference
    path of ``benchmarks/ssl_pretrain.py``.
    """

    compile_targets = ("net",)  # compiled in place by location.compile (stedm.run.maybe_compile)
    #: the U-Net sees channels-last activations (``location.channels_last``, :func:`stedm.run.apply_channels_last`;
    #: on by default under bf16-mixed)
    channels_last = False

    def __init__(
        self,
        net: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr: float = 1e-4,
        noise_schedule: Mapping[str, Any] | None = None,
        prediction_type: str = "epsilon",
        weighting: str = "p2",
        p2_k: float = 1.0,
        p2_gamma: float = 1.0,
        min_snr_gamma: float = 5.0,
        ema_decay: float = 0.9999,
        sample_every_n_epochs: int = 10,
        sampling: SamplingOptions | Mapping[str, Any] | None = None,
        sample_images: int = 4,
        sample_frames: int = 10,
        attention: str = "sdpa",
        ema_foreach: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(getattr(net, "config", None), dict):
            raise TypeError("SSLPretrainer: net must be an SSLUNet (its .config rebuilds it from pretrained_unet.pt)")
        self.sampling = SamplingOptions.from_config(
            {"solver": "ddpm", "steps": 1000} if sampling is None else sampling, "model.sampling")
        if sample_frames < 2:
            raise ValueError(f"sample_frames must be >= 2 (first and last), got {sample_frames}")
        self.save_hyperparameters(ignore=["net", "optimizer", "sampling"])
        self.hparams["sampling"] = self.sampling.to_dict()
        self.net = net
        set_attention(self.net, attention)
        self.optimizer = optimizer if optimizer is not None else functools.partial(torch.optim.Adam)
        self.lr = lr
        self.noise_scheduler = make_scheduler(
            prediction_type, **(SCHEDULES["genselfdiff"] if noise_schedule is None else noise_schedule))
        self.loss_weighting = LossWeighting(
            self.noise_scheduler, weighting, prediction_type, p2_k, p2_gamma, min_snr_gamma)
        self.loss = DiffusionLoss(self.noise_scheduler, "l2", self.loss_weighting)
        self.ema = ParameterEMA(self.net.named_parameters, ema_decay, foreach=ema_foreach, on_missing="raise")
        self._sample_shape: tuple[int, ...] | None = None

    # -- training ---------------------------------------------------------------------------------
    def diffusion_loss(self, images: torch.Tensor, noise: torch.Tensor | None = None,
                       timesteps: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """λ_t-weighted MSE of the denoiser on ``images`` (``B x C x H x W`` in ``[-1, 1]``), mean over batch.

        ``noise`` and ``timesteps`` are drawn (from ``generator`` if given) unless passed.
        """
        return self.loss(lambda x_t, t: self.net(channels_last_input(x_t, self.channels_last), t), images, noise,
                         timesteps, generator)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        if self._sample_shape is None:
            self._sample_shape = tuple(images.shape[1:])
        loss = self.diffusion_loss(images)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Same loss with noise and timesteps fixed per batch index, so epochs are comparable.

        Whole validation images are cropped (top-left) to a multiple of the U-Net's down-sampling factor.
        """
        factor = self.net.downsampling_factor
        images = batch["image"]
        images = images[..., : images.shape[-2] // factor * factor, : images.shape[-1] // factor * factor]
        generator = torch.Generator(device=images.device).manual_seed(batch_idx)
        loss = self.diffusion_loss(images, generator=generator)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.net.parameters(), lr=self.lr)

    # -- EMA (stedm.modules.ema) ------------------------------------------------------------------
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Once per real optimizer step (after gradient accumulation), and before the checkpoint
        # callbacks of the same batch run, so a resumed run continues the exact EMA.
        super().optimizer_step(*args, **kwargs)
        self.ema.update()

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """``net.state_dict()`` with every parameter replaced by its EMA value."""
        return self.ema.averaged(self.net.state_dict())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.ema.save(checkpoint)
        self._write_pretrained()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.ema.load(checkpoint)

    def on_fit_end(self) -> None:
        self._write_pretrained()

    def _write_pretrained(self) -> None:
        if self.trainer.is_global_zero:
            root, ema, live = Path(self.trainer.default_root_dir), self.ema_state_dict(), self.net.state_dict()
            for name in (PRETRAINED_FILENAME, PRETRAINED_SAFETENSORS):
                save_pretrained_unet(root / name, self.net.config, ema, live=live)

    # -- export (stedm.callbacks.ExportWeights): the EMA weights, as sampling and fine-tuning use
    def export_state_dict(self) -> tuple[dict[str, torch.Tensor], str]:
        ema = self.ema_state_dict()
        return {k: (ema[k[len("net."):]] if k.startswith("net.") else v).detach().clone()
                for k, v in self.state_dict().items()}, "ema"

    def export_card(self) -> dict[str, Any]:
        return {"model": {"ssl_unet": dict(self.net.config)}}

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_trajectory(self, num_images: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
        """Generate ``num_images`` images of ``shape`` (C, H, W) with the current weights.

        Returns up to ``sample_frames`` snapshots ``frames x num_images x C x H x W`` in the model's
        range, evenly spaced along the trajectory: the initial noise first, the final sample last.
        The starting noise and the solver's noise are fixed by ``seed``.
        """
        snapshot_every = math.ceil(self.sampling.steps / (self.hparams.sample_frames - 1))
        inputs: list[torch.Tensor] = []  # every snapshot_every-th denoiser input x_t, from x_T on
        calls = 0

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            if calls % snapshot_every == 0:
                inputs.append(x)
            calls += 1
            return to_epsilon(self.noise_scheduler, self.net(x, t), x, t)

        noise = noise_for_indices(range(num_images), seed, shape, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        final = sample(model_fn, noise, self.noise_scheduler, self.sampling.solver, self.sampling.steps,
                       self.sampling.spacing, generator=generator)
        keep = torch.linspace(0, len(inputs) - 1, min(len(inputs), self.hparams.sample_frames - 1)).round().long()
        return torch.stack([inputs[i] for i in keep.tolist()] + [final])

    def on_train_epoch_end(self) -> None:
        every = self.hparams.sample_every_n_epochs
        if not every or (self.current_epoch + 1) % every or not self.trainer.is_global_zero:
            return
        if self._sample_shape is None:
            return
        with self.ema.swapped_in():
            frames = self.sample_trajectory(self.hparams.sample_images, self._sample_shape)
        # rows = samples, columns = trajectory
        grid = make_grid(frames.transpose(0, 1).flatten(0, 1).float(), nrow=frames.shape[0], padding=2, pad_value=1.0)
        path = Path(self.trainer.default_root_dir) / "samples" / f"epoch_{self.current_epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tensor_to_image(grid)).save(path)
