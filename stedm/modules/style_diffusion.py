"""STEDM's conditional latent diffusion model as a LightningModule.

The denoiser sees the noisy latent concatenated with the encoded layout and, through its style
input, one style vector extracted from a set of style images. Classifier-free guidance acts on
the style only: training replaces the style images of a sample by the null style with
probability ``style_dropout``; sampling contrasts the real and the null style. The layout is
never dropped.

Fixed with respect to the original: the style encoder and aggregator are optimised, the EMA
weights are the ones used for sampling, the first stage encodes whole batches, and guidance
evaluates both halves in one batched forward pass that computes the layers before the style
block only once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import make_grid

from stedm.data.contract import IGNORE_INDEX, tensor_to_image
from stedm.data.latent_cache import training_latents
from stedm.diffusion.guidance import GUIDANCE_MODES, guided_model_fn, guided_pair_fn
from stedm.diffusion.sampling import SAMPLERS, Progress, noise_for_indices, sample
from stedm.diffusion.schedules import make_scheduler, to_epsilon, training_target
from stedm.models.style import null_style_like
from stedm.run import channels_last_input

log = logging.getLogger(__name__)

LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


class StyleDiffusion(pl.LightningModule):
    """Layout- and style-conditioned diffusion (STEDM).

    ``location.compile`` compiles the networks named in ``compile_targets`` (the denoiser).

    Args:
        denoiser: ``forward(x: B x (latent_channels + layout channels) x h x w, t: B,
            style: B x D | None) -> B x latent_channels x h x w`` (:func:`stedm.models.denoiser.build_denoiser`).
        first_stage: frozen autoencoder with ``encode``/``decode``, ``latent_channels`` and
            ``downsample_factor`` (:func:`stedm.models.first_stage.build_first_stage`).
        layout_encoder: one-hot layout -> extra denoiser input channels at latent size
            (:class:`stedm.models.layout.LayoutEncoder`, built for 2 classes if ``binary_layout``).
        style: style images B x n x 3 x H x W -> B x D (:class:`stedm.models.style.StyleExtractor`);
            ``None`` for style sampling ``none``: no style path at all (the denoiser must have none).
        optimizer: ``optimizer(params, lr=...)``, e.g. a Hydra ``_partial_`` of ``torch.optim.AdamW``
            (pass ``fused: true`` there for the fused CUDA kernel).
        lr: learning rate (already scaled by batch size and devices in the config).
        num_classes: classes of the masks; used for the one-hot layout when not ``binary_layout``.
        binary_layout: the layout is background (0) vs. the union of all foreground classes, as in
            STEDM (``data.binary_layout``, the one label-space key of a data setting; false: all
            ``num_classes``). Pixels marked ``IGNORE_INDEX`` count as background.
        noise_schedule: keyword arguments of :func:`stedm.diffusion.schedules.make_scheduler`
            except ``prediction_type`` (defaults: STEDM's scaled_linear 0.0015 -> 0.0205, T = 1000).
        prediction_type: ``epsilon`` (STEDM) or ``v_prediction``.
        loss: ``l1`` (STEDM) or ``l2``.
        style_dropout: probability that a training sample's style images become the null style.
        ema_decay: decay of the EMA over every trainable parameter (``None``: no EMA; sampling
            then uses the live weights).
        sample_every_n_steps: write a sample grid every this many optimizer steps (0/None: never).
        num_sample_images: rows of that grid (taken from the current training batch).
        sampler, sample_steps, spacing, cfg_scale, rescale, guidance_mode, batched_guidance,
        shared_trunk: defaults of :meth:`generate` (see :func:`stedm.diffusion.sampling.sample` and
            :func:`stedm.diffusion.guidance.guide`).
        sample_seed: seed of the starting noise of the sample grid.
    """

    compile_targets = ("denoiser",)
    #: training feeds the first stage and the denoiser channels-last activations (set by
    #: ``location.channels_last``, :func:`stedm.run.apply_channels_last`; on by default under bf16-mixed)
    channels_last = False

    def __init__(
        self,
        denoiser: nn.Module,
        first_stage: nn.Module,
        layout_encoder: nn.Module,
        style: nn.Module | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        lr: float = 1e-4,
        num_classes: int = 2,
        binary_layout: bool = True,
        noise_schedule: dict[str, Any] | None = None,
        prediction_type: str = "epsilon",
        loss: str = "l1",
        style_dropout: float = 0.25,
        ema_decay: float | None = 0.9999,
        sample_every_n_steps: int | None = None,
        num_sample_images: int = 4,
        sampler: str = "ddim",
        sample_steps: int = 128,
        spacing: str | None = None,
        cfg_scale: float = 1.5,
        rescale: float = 0.7,
        guidance_mode: str = "stedm",
        batched_guidance: bool = True,
        shared_trunk: bool = True,
        sample_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["denoiser", "first_stage", "layout_encoder", "style", "optimizer"])
        _check_choice("loss", loss, LOSSES)
        _check_choice("sampler", sampler, SAMPLERS)
        _check_choice("guidance_mode", guidance_mode, GUIDANCE_MODES)
        if not 0.0 <= style_dropout <= 1.0:
            raise ValueError(f"style_dropout must lie in [0, 1], got {style_dropout}")
        has_style_path = getattr(denoiser, "style_injection", None) is not None
        if (style is None) == has_style_path:
            raise ValueError(
                f"style={'null' if style is None else type(style).__name__} does not fit the denoiser's "
                f"style_injection={getattr(denoiser, 'style_injection', None)!r}: style sampling 'none' needs "
                "style_injection null, every other style sampling a style module and a style injection")
        noise_schedule = dict(noise_schedule or {})
        if "prediction_type" in noise_schedule:
            raise ValueError("set prediction_type on StyleDiffusion itself, not inside noise_schedule")
        layout_channels = 2 if binary_layout else num_classes
        if layout_encoder.channel_mapper.in_channels != layout_channels:
            raise ValueError(
                f"the layout encoder takes {layout_encoder.channel_mapper.in_channels} classes but the layout has "
                f"{layout_channels} ({'binary layout' if binary_layout else 'num_classes'}, from data.binary_layout); "
                f"build it with num_classes={layout_channels}")

        self.denoiser = denoiser
        self.first_stage = first_stage
        self.layout_encoder = layout_encoder
        self.style = style
        self.noise_scheduler = make_scheduler(**noise_schedule, prediction_type=prediction_type)
        self._optimizer_factory = optimizer
        self.lr = lr
        self.layout_channels = layout_channels
        self.binary_layout = binary_layout
        self.loss_fn = LOSSES[loss]
        self.style_dropout = style_dropout
        self.ema = None if ema_decay is None else EMAModel(self._trainable_parameters(), decay=ema_decay, foreach=True)
        self._last_sample_step = -1

    # ------------------------------------------------------------------ conditioning
    def _trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def layout_classes(self, mask: Tensor) -> Tensor:
        """Mask B x H x W (class ids, ``IGNORE_INDEX`` = background) -> the class ids of the
        layout the model is conditioned on (``data.binary_layout``: 0 vs 1 = any foreground);
        the label space of the pairs ``predict_diff.py`` writes."""
        classes = mask.masked_fill(mask == IGNORE_INDEX, 0).long()
        if self.binary_layout:
            return (classes > 0).long()
        if int(classes.max()) >= self.layout_channels or int(classes.min()) < 0:
            raise ValueError(f"mask holds class ids {classes.unique().tolist()} outside 0..{self.layout_channels - 1}; "
                             "check data.num_classes and data.binary_layout")
        return classes

    def layout_onehot(self, mask: Tensor) -> Tensor:
        """Mask B x H x W (class ids, ``IGNORE_INDEX`` = background) -> one-hot B x C x H x W float."""
        return F.one_hot(self.layout_classes(mask), self.layout_channels).movedim(-1, 1).float()

    def _predict_eps(self, x_t: Tensor, t: Tensor, layout: Tensor, style_vector: Tensor | None = None) -> Tensor:
        output = self.denoiser(torch.cat([x_t, layout], dim=1), t, style_vector)
        # float32 from here on: guidance statistics and sampler updates are not for bf16 autocast
        return to_epsilon(self.noise_scheduler, output.float(), x_t, t)

    def _predict_eps_pair(self, x_t: Tensor, t: Tensor, layout: Tensor, style_vector: Tensor,
                          null_style_vector: Tensor) -> tuple[Tensor, Tensor]:
        """(conditional, unconditional) eps of one input, the denoiser's shared trunk computed once."""
        outputs = self.denoiser.forward_guided(torch.cat([x_t, layout], dim=1), t, style_vector, null_style_vector)
        return tuple(to_epsilon(self.noise_scheduler, output.float(), x_t, t) for output in outputs)

    def _training_style(self, batch: dict[str, Any]) -> Tensor | None:
        """The batch's style images with style dropout applied (None without a style path)."""
        if self.style is None:
            return None
        if "style" not in batch:
            raise ValueError("the model has a style path but the batch has no 'style' images; choose a style "
                             "sampling other than 'none' for the data, or build the model without style")
        style = batch["style"]
        dropped = torch.rand(style.shape[0], device=style.device) < self.style_dropout
        return torch.where(dropped.view(-1, 1, 1, 1, 1), null_style_like(style), style)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.channels_last and "image" in batch:
            batch = {**batch, "image": channels_last_input(batch["image"], True)}
        # cached (data.cache_latents) or encoded now; contiguous, so the noise drawn like them is the
        # same in either memory format
        latents = training_latents(self.first_stage, batch).contiguous()
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        layout = self.layout_encoder(self.layout_onehot(batch["mask"]), latents.shape[-2:])
        style = self._training_style(batch)
        style_vector = None if style is None else self.style(style)
        prediction = self.denoiser(channels_last_input(torch.cat([noisy, layout], dim=1), self.channels_last), t,
                                   style_vector)
        target = training_target(self.noise_scheduler, latents, noise, t)
        loss = self.loss_fn(prediction.float(), target.float())
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer_factory(self._trainable_parameters(), lr=self.lr)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Lightning calls this once per real optimizer step (after gradient accumulation).
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.step(self._ema_parameters())

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        every, step = self.hparams.sample_every_n_steps, self.global_step
        # With gradient accumulation several batches end on the same step: sample once.
        if not every or step == 0 or step % every or step == self._last_sample_step:
            return
        self._last_sample_step = step
        if self.trainer.is_global_zero:
            self.write_sample_grid(batch, step)

    # ------------------------------------------------------------------ EMA
    def _ema_parameters(self) -> list[nn.Parameter]:
        """The parameters the EMA tracks, with the EMA moved to their device (Lightning moves the
        module after construction and checkpoints load on the CPU; the EMA is no submodule)."""
        params = self._trainable_parameters()
        if self.ema.shadow_params[0].device != params[0].device:
            self.ema.to(device=params[0].device)
        return params

    def bake_ema(self) -> StyleDiffusion:
        """Copy the EMA weights into the model for good and drop the EMA: for inference only
        (``predict_diff.py``), so that every :meth:`generate` call skips swapping ~1 GB of
        weights (paper preset) in and out. Returns the module."""
        if self.ema is not None:
            self.ema.copy_to(self._ema_parameters())
            self.ema = None
        return self

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap the EMA weights into the model for the duration of the block, then restore."""
        if self.ema is None:
            yield
            return
        params = self._ema_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is None:
            return
        if "ema" not in checkpoint:
            log.warning("the checkpoint holds no EMA weights; the EMA starts from the checkpoint's weights")
            state = checkpoint["state_dict"]
            names = [name for name, p in self.named_parameters() if p.requires_grad]
            self.ema = EMAModel([state[name] for name in names], decay=self.ema.decay, foreach=True)
            return
        shadow = checkpoint["ema"]["shadow_params"]
        own = self._trainable_parameters()
        if [tuple(s.shape) for s in shadow] != [tuple(p.shape) for p in own]:
            raise ValueError("the checkpoint's EMA weights do not match this model's trainable parameters; "
                             "build the model with the config the checkpoint was trained with")
        self.ema.load_state_dict(checkpoint["ema"])

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        mask: Tensor,
        style: Tensor | None = None,
        noise: Tensor | None = None,
        seed: int = 0,
        indices: Sequence[int] | Tensor | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        cfg_scale: float | None = None,
        rescale: float | None = None,
        guidance_mode: str | None = None,
        batched_guidance: bool | None = None,
        shared_trunk: bool | None = None,
        progress: Progress | None = None,
    ) -> Tensor:
        """Images B x 3 x H x W in [-1, 1] for layouts ``mask`` (B x H x W) in the style of ``style``.

        ``style``: B x n x 3 x H x W in [-1, 1], required exactly when the model has a style path.
        Starting noise: ``noise`` (B x latent_channels x H/f x W/f) if given, else drawn per sample
        from (``seed``, ``indices[i]``) (``indices`` default 0..B-1), so a pair's image does not
        depend on the batch it is generated in. Sampling arguments left ``None`` take the module's
        defaults. Uses the EMA weights; guidance only with a style and ``cfg_scale`` != 1.

        Guidance passes: ``batched_guidance`` False runs the conditional and the unconditional
        half as two forward passes (the original's way); True runs them as one batch, and with
        ``shared_trunk`` (and a denoiser that has ``forward_guided``) computes the layers before
        the style block once for both halves. All three give the same images.
        """
        hp = self.hparams
        sampler, steps = sampler or hp.sampler, steps or hp.sample_steps
        spacing = spacing if spacing is not None else hp.spacing
        cfg_scale = hp.cfg_scale if cfg_scale is None else cfg_scale
        rescale = hp.rescale if rescale is None else rescale
        guidance_mode = guidance_mode or hp.guidance_mode
        batched_guidance = hp.batched_guidance if batched_guidance is None else batched_guidance
        shared_trunk = hp.shared_trunk if shared_trunk is None else shared_trunk
        if (style is None) != (self.style is None):
            raise ValueError("generate(): pass style images exactly when the model has a style path "
                             f"(it has {'none' if self.style is None else 'one'})")
        if mask.ndim != 3:
            raise ValueError(f"generate(): mask must be B x H x W class ids, got {tuple(mask.shape)}")
        factor = self.first_stage.downsample_factor
        height, width = mask.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(f"generate(): mask size {height}x{width} must be a multiple of the first stage's "
                             f"downsampling factor {factor}")
        latent_shape = (self.first_stage.latent_channels, height // factor, width // factor)
        if noise is None:
            noise = noise_for_indices(range(mask.shape[0]) if indices is None else indices, seed, latent_shape,
                                      self.device)
        elif tuple(noise.shape) != (mask.shape[0], *latent_shape):
            raise ValueError(f"generate(): noise must be {(mask.shape[0], *latent_shape)}, got {tuple(noise.shape)}")

        was_training = self.training
        self.eval()
        try:
            with self.ema_weights():
                layout = self.layout_encoder(self.layout_onehot(mask.to(self.device)), latent_shape[1:])
                if self.style is None:
                    model_fn = guided_model_fn(self._predict_eps, (layout,), (layout,), scale=1.0)
                else:
                    style = style.to(self.device)
                    cond = self.style(style)
                    # every sample's null style is the same image set: encode it once
                    uncond = cond if cfg_scale == 1.0 else self.style(null_style_like(style[:1])).expand_as(cond)
                    share_trunk = hasattr(self.denoiser, "forward_guided") and batched_guidance and shared_trunk
                    if share_trunk and cfg_scale != 1.0:
                        model_fn = guided_pair_fn(lambda x_t, t: self._predict_eps_pair(x_t, t, layout, cond, uncond),
                                                  cfg_scale, rescale, guidance_mode)
                    else:
                        model_fn = guided_model_fn(self._predict_eps, (layout, cond), (layout, uncond), cfg_scale,
                                                   rescale, guidance_mode, batched_guidance)
                latents = sample(model_fn, noise.to(self.device), self.noise_scheduler, sampler, steps, spacing,
                                 progress)
                return self.first_stage.decode(latents).clamp(-1.0, 1.0)
        finally:
            self.train(was_training)

    def write_sample_grid(self, batch: dict[str, Any], step: int) -> Path:
        """Generate from the first rows of ``batch``; save (and log) a grid with one row per sample:
        layout | real image | style images | generated image. Returns the PNG's path."""
        k = min(self.hparams.num_sample_images, batch["mask"].shape[0])
        style = batch["style"][:k] if self.style is not None else None
        generated = self.generate(batch["mask"][:k], style, seed=self.hparams.sample_seed)
        grid = _sample_grid(self.layout_onehot(batch["mask"][:k]), batch["image"][:k], style, generated)
        path = Path(self.trainer.default_root_dir) / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B, Neptune
                logger.log_image(key="samples", images=[grid], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("samples", grid, step, dataformats="HWC")
        return path


def _sample_grid(layout: Tensor, image: Tensor, style: Tensor | None, generated: Tensor) -> Any:
    """uint8 H x W x 3 grid, one row per sample: layout (grey levels by class) | image | styles | generated."""
    size = image.shape[-2:]
    classes = layout.argmax(dim=1, keepdim=True).float()
    columns = [classes.div(max(layout.shape[1] - 1, 1)).mul(2).sub(1).expand(-1, 3, -1, -1), image]
    if style is not None:
        columns += [F.interpolate(s, size=size) if s.shape[-2:] != size else s for s in style.unbind(dim=1)]
    columns.append(generated)
    tiles = torch.stack([c.detach().float().cpu() for c in columns], dim=1).flatten(0, 1)
    return tensor_to_image(make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0))


def _check_choice(name: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
