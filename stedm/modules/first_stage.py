"""Training a first stage (autoencoder) on your own data: ``python -m stedm.train_first_stage``.

A diffusers ``AutoencoderKL`` (``kind=kl``) or ``VQModel`` (``kind=vq_f4``) trained with the LDM
recipe's losses that need no downloaded weights: L1 reconstruction plus the KL term (KL) or the
codebook/commitment loss (VQ). Validation reports PSNR and SSIM on held-out images (data range
[-1, 1] mapped to [0, 1]) and writes a reconstruction grid per epoch. The run's final export
(:class:`stedm.callbacks.ExportWeights`) carries the architecture in its model card, so
``diffusion.first_stage.weights_path=<run dir>/final.safetensors`` loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from stedm.models.first_stage import architecture, build_model


def crop_to_multiple(x: Tensor, factor: int) -> Tensor:
    h, w = (x.shape[-2] // factor) * factor, (x.shape[-1] // factor) * factor
    return x[..., :h, :w]


def reconstruction_metrics(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """PSNR (dB) and SSIM of reconstructions ``y`` of ``x``, both in [-1, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = ((x.float() + 1) / 2).clamp(0, 1), ((y.float() + 1) / 2).clamp(0, 1)
    return {"psnr": peak_signal_noise_ratio(b, a, data_range=1.0),
            "ssim": structural_similarity_index_measure(b, a, data_range=1.0)}


class FirstStageTrainer(pl.LightningModule):
    def __init__(self, kind: str, config: dict[str, Any], optimizer: Callable[..., torch.optim.Optimizer], lr: float,
                 kl_weight: float = 1.0e-6, codebook_weight: float = 1.0, grid_images: int = 4) -> None:
        super().__init__()
        if kind not in ("kl", "vq_f4"):
            raise ValueError(f"first_stage.kind={kind!r}; choose kl or vq_f4")
        self.kind, self.model = kind, build_model(kind, dict(config))
        self.factor = 2 ** (len(self.model.config.block_out_channels) - 1)
        self.optimizer, self.lr = optimizer, lr
        self.kl_weight, self.codebook_weight, self.grid_images = kl_weight, codebook_weight, grid_images
        self._grid: list[Tensor] = []

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(reconstruction, regulariser)``: KL of the posterior, or the VQ codebook loss."""
        if self.kind == "kl":
            posterior = self.model.encode(x).latent_dist
            z = posterior.sample() if self.training else posterior.mode()
            return self.model.decode(z).sample, posterior.kl().mean()
        h = self.model.encode(x).latents
        out = self.model.decode(h, return_dict=True)
        return out.sample, out.commit_loss.mean() if out.commit_loss is not None else h.new_zeros(())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = crop_to_multiple(batch["image"], self.factor)
        y, reg = self.reconstruct(x)
        l1 = (y - x).abs().mean()
        loss = l1 + (self.kl_weight if self.kind == "kl" else self.codebook_weight) * reg
        self.log_dict({"train/loss": loss, "train/l1": l1, "train/reg": reg}, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = crop_to_multiple(batch["image"], self.factor)
        y, _ = self.reconstruct(x)
        metrics = reconstruction_metrics(x, y)
        self.log_dict({"val/l1": (y - x).abs().mean(), **{f"val/{k}": v for k, v in metrics.items()}},
                      batch_size=x.shape[0], sync_dist=True)
        if sum(len(g) for g in self._grid) < self.grid_images:
            self._grid.append(torch.cat([x, y.clamp(-1, 1)], dim=-1).cpu())

    def on_validation_epoch_end(self) -> None:
        if self._grid and self.trainer.is_global_zero:
            import torchvision

            folder = Path(self.trainer.default_root_dir) / "reconstructions"
            folder.mkdir(parents=True, exist_ok=True)
            size = min(g.shape[-2] for g in self._grid), min(g.shape[-1] for g in self._grid)
            images = torch.cat([g[..., :size[0], :size[1]] for g in self._grid])[:self.grid_images]
            torchvision.utils.save_image((images + 1) / 2, folder / f"epoch{self.current_epoch:03d}.png", nrow=1)
        self._grid = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.model.parameters(), lr=self.lr)

    # -- export (stedm.callbacks.ExportWeights) --------------------------------------------------
    def export_state_dict(self) -> tuple[dict[str, Tensor], str]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}, "live"

    def export_card(self) -> dict[str, Any]:
        return {"model": {"first_stage": architecture(self.model)}}
