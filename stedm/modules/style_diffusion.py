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
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import make_grid

from stedm.data.contract import IGNORE_INDEX, tensor_to_image
from stedm.data.latent_cache import training_latents
from stedm.diffusion.guidance import guided_model_fn, guided_pair_fn
from stedm.diffusion.options import SamplingOptions
from stedm.diffusion.schedules import SCHEDULES, make_scheduler, to_epsilon
from stedm.diffusion.solvers import Progress, noise_for_indices, sample
from stedm.losses.diffusion import DiffusionLoss
from stedm.models.style import null_style_like
from stedm.modules.ema import ParameterEMA
from stedm.run import channels_last_input

log = logging.getLogger(__name__)


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
            except ``prediction_type``, the shape both diffusion modules take (default
            ``SCHEDULES["stedm"]``: scaled_linear 0.0015 -> 0.0205, T = 1000).
        prediction_type: ``epsilon`` (STEDM) or ``v_prediction``.
        loss: the distance of :class:`stedm.losses.diffusion.DiffusionLoss`, ``l1`` (STEDM) or ``l2``.
        style_dropout: probability that a training sample's style images become the null style.
        ema_decay: decay of the EMA over every trainable parameter (``None``: no EMA; sampling
            then uses the live weights).
        sample_every_n_steps: write a sample grid every this many optimizer steps (0/None: never).
        num_sample_images: rows of that grid (taken from the current training batch).
        sampling: how the sample grid and :meth:`generate` sample by default, a
            :class:`stedm.diffusion.options.SamplingOptions` or its mapping (``conf/sampling``).
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
        sampling: SamplingOptions | Mapping[str, Any] | None = None,
        sample_seed: int = 0,
    ):
        super().__init__()
        self.sampling = SamplingOptions.from_config(sampling, "model.sampling")
        self.save_hyperparameters(ignore=["denoiser", "first_stage", "layout_encoder", "style", "optimizer",
                                          "sampling"])
        self.hparams["sampling"] = self.sampling.to_dict()
        if not 0.0 <= style_dropout <= 1.0:
            raise ValueError(f"style_dropout must lie in [0, 1], got {style_dropout}")
        has_style_path = getattr(denoiser, "style_injection", None) is not None
        if (style is None) == has_style_path:
            raise ValueError(
                f"style={'null' if style is None else type(style).__name__} does not fit the denoiser's "
                f"style_injection={getattr(denoiser, 'style_injection', None)!r}: style sampling 'none' needs "
                "style_injection null, every other style sampling a style module and a style injection")
        noise_schedule = dict(SCHEDULES["stedm"] if noise_schedule is None else noise_schedule)
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
        self.loss = DiffusionLoss(self.noise_scheduler, loss)
        self._optimizer_factory = optimizer
        self.lr = lr
        self.layout_channels = layout_channels
        self.binary_layout = binary_layout
        self.style_dropout = style_dropout
        self.ema = None if ema_decay is None else ParameterEMA(self._named_trainable, ema_decay)
        self._last_sample_step = -1

    # ------------------------------------------------------------------ conditioning
    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def _trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self._named_trainable()]

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
        # float32 from here on: guidance statistics and solver updates are not for bf16 autocast
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

        def denoise(noisy: Tensor, t: Tensor) -> Tensor:
            layout = self.layout_encoder(self.layout_onehot(batch["mask"]), latents.shape[-2:])
            style = self._training_style(batch)
            style_vector = None if style is None else self.style(style)
            return self.denoiser(channels_last_input(torch.cat([noisy, layout], dim=1), self.channels_last), t,
                                 style_vector)

        loss = self.loss(denoise, latents)
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer_factory(self._trainable_parameters(), lr=self.lr)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Lightning calls this once per real optimizer step (after gradient accumulation).
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        every, step = self.hparams.sample_every_n_steps, self.global_step
        # With gradient accumulation several batches end on the same step: sample once.
        if not every or step == 0 or step % every or step == self._last_sample_step:
            return
        self._last_sample_step = step
        if self.trainer.is_global_zero:
            self.write_sample_grid(batch, step)

    # ------------------------------------------------------------------ EMA (stedm.modules.ema)
    def bake_ema(self) -> StyleDiffusion:
        """Copy the EMA weights into the model for good and drop the EMA: for inference only
        (``predict_diff.py``), so that every :meth:`generate` call skips swapping ~1 GB of
        weights (paper preset) in and out. Returns the module."""
        if self.ema is not None:
            self.ema.bake()
            self.ema = None
        return self

    def ema_weights(self) -> Any:
        """A context with the EMA weights swapped into the model (the live ones without an EMA)."""
        return nullcontext() if self.ema is None else self.ema.swapped_in()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.load(checkpoint)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        mask: Tensor,
        style: Tensor | None = None,
        noise: Tensor | None = None,
        seed: int = 0,
        indices: Sequence[int] | Tensor | None = None,
        sampling: SamplingOptions | None = None,
        progress: Progress | None = None,
        **changes: Any,
    ) -> Tensor:
        """Images B x 3 x H x W in [-1, 1] for layouts ``mask`` (B x H x W) in the style of ``style``.

        ``style``: B x n x 3 x H x W in [-1, 1], required exactly when the model has a style path.
        Starting noise: ``noise`` (B x latent_channels x H/f x W/f) if given, else drawn per sample
        from (``seed``, ``indices[i]``) (``indices`` default 0..B-1), so a pair's image does not
        depend on the batch it is generated in. ``sampling``: the settings (default: the module's
        ``sampling``), ``changes``: fields of it to change for this call (``steps=4``,
        ``cfg_scale=1.0``, ...). Uses the EMA weights; guidance only with a style and
        ``cfg_scale`` != 1.

        Guidance passes: ``batched_guidance`` False runs the conditional and the unconditional
        half as two forward passes (the original's way); True runs them as one batch, and with
        ``shared_trunk`` (and a denoiser that has ``forward_guided``) computes the layers before
        the style block once for both halves. All three give the same images.
        """
        options = sampling or self.sampling
        if changes:
            options = options.replace(**changes)
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
                    guided = options.cfg_scale != 1.0
                    uncond = self.style(null_style_like(style[:1])).expand_as(cond) if guided else cond
                    if guided and options.batched_guidance and options.shared_trunk \
                            and hasattr(self.denoiser, "forward_guided"):
                        model_fn = guided_pair_fn(lambda x_t, t: self._predict_eps_pair(x_t, t, layout, cond, uncond),
                                                  options.cfg_scale, options.rescale, options.guidance_mode)
                    else:
                        model_fn = guided_model_fn(self._predict_eps, (layout, cond), (layout, uncond),
                                                   options.cfg_scale, options.rescale, options.guidance_mode,
                                                   options.batched_guidance)
                latents = sample(model_fn, noise.to(self.device), self.noise_scheduler, options.solver, options.steps,
                                 options.spacing, progress)
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

