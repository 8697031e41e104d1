"""Training a first stage (autoencoder) on your own data: ``python -m stedm.train_first_stage``.

A diffusers ``AutoencoderKL`` (``kind=kl``) or ``VQModel`` (``kind=vq_f4``) trained with the LDM
recipe's losses that need no downloaded weights: L1 reconstruction plus the KL term (KL) or the
codebook/commitment loss (VQ); optionally (``model.disc_weight`` > 0) the LDM patch discriminator
with hinge loss, switched on after ``model.disc_start`` batches, its weight adapted to the
reconstruction gradient at the decoder's last layer (``model.adaptive_weight``); and optionally
LPIPS (``model.lpips_weights``: a local file, never downloaded). The discriminator is trained by
the same optimiser as its own parameter group (one step per batch, automatic optimisation, so
gradient accumulation, clipping and the exact resume of every run apply): the generator loss
sees it through detached parameters, its hinge loss sees detached reconstructions, so each part
gets only its own gradients -- with Adam's per-parameter state the same updates as LDM's two
optimisers of equal settings. Validation reports PSNR and SSIM on held-out images (data range
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
import torch.nn.functional as F
from torch import Tensor, nn

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


class PatchDiscriminator(nn.Sequential):
    """The PatchGAN discriminator of pix2pix as LDM uses it (``NLayerDiscriminator``): 4x4 convs,
    ``layers`` of them with stride 2 and batch norm, one logit per overlapping patch."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3) -> None:
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            blocks += [nn.Conv2d(width, out, 4, 2 if n < layers else 1, 1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2, True)]
            width = out
        super().__init__(*blocks, nn.Conv2d(width, 1, 4, 1, 1))
        for m in self.modules():  # LDM's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def load_lpips(path: str) -> nn.Module:
    """LPIPS (VGG) with every weight from the local file ``path`` (model.lpips_weights): the
    network definition is torchmetrics'; nothing is downloaded. The file must hold the whole
    LPIPS state dict (VGG16 backbone ``net.*`` and linear layers ``lin*``), e.g. saved from
    ``torchmetrics.functional.image.lpips._LPIPS(net="vgg").state_dict()`` on a machine with internet."""
    from torchmetrics.functional.image.lpips import _LPIPS

    from stedm.models.weights import load_strict, read_state_dict

    net = _LPIPS(pretrained=False, net="vgg", pnet_rand=True)
    state = read_state_dict(path, "model.lpips_weights")
    if not any(k.startswith("net.") for k in state):
        raise ValueError(f"model.lpips_weights={path!r} holds no VGG backbone weights (net.*), only the linear layers; "
                         "give a file with the whole LPIPS state dict (backbone and lin layers), or set "
                         "model.lpips_weights=null to train without LPIPS")
    load_strict(net, state, f"model.lpips_weights={path!r}")
    return net.eval().requires_grad_(False)


class FirstStageTrainer(pl.LightningModule):
    def __init__(self, kind: str, config: dict[str, Any], optimizer: Callable[..., torch.optim.Optimizer], lr: float,
                 kl_weight: float = 1.0e-6, codebook_weight: float = 1.0, grid_images: int = 4,
                 disc_weight: float = 0.0, disc_start: int = 0, adaptive_weight: bool = True,
                 disc_channels: int = 64, disc_layers: int = 3, lpips_weights: str | None = None,
                 lpips_weight: float = 1.0) -> None:
        super().__init__()
        if kind not in ("kl", "vq_f4"):
            raise ValueError(f"first_stage.kind={kind!r}; choose kl or vq_f4")
        if disc_weight < 0 or disc_start < 0:
            raise ValueError(f"model.disc_weight={disc_weight} and model.disc_start={disc_start} must be >= 0 "
                             "(model.disc_weight=0 trains without discriminator)")
        self.kind, self.model = kind, build_model(kind, dict(config))
        self.factor = 2 ** (len(self.model.config.block_out_channels) - 1)
        self.optimizer, self.lr = optimizer, lr
        self.kl_weight, self.codebook_weight, self.grid_images = kl_weight, codebook_weight, grid_images
        self.disc_weight, self.disc_start, self.adaptive_weight = disc_weight, disc_start, adaptive_weight
        self.discriminator = PatchDiscriminator(disc_channels, disc_layers) if disc_weight > 0 else None
        self.lpips = load_lpips(lpips_weights) if lpips_weights else None
        self.lpips_weight = lpips_weight
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
        rec = l1
        if self.lpips is not None:
            self.lpips.eval()
            rec = rec + self.lpips_weight * self.lpips(x.float(), y.float()).mean()
        loss = rec + (self.kl_weight if self.kind == "kl" else self.codebook_weight) * reg
        logs = {"train/l1": l1, "train/reg": reg}
        if self.discriminator is not None and self.global_step >= self.disc_start:
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            g_loss = -torch.func.functional_call(self.discriminator, frozen, (y,), strict=False).mean()
            weight = self.disc_weight * (self._adaptive_weight(rec, g_loss) if self.adaptive_weight else 1.0)
            d_loss = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(y.detach()))
            loss = loss + weight * g_loss + d_loss
            logs.update({"train/g_loss": g_loss, "train/d_loss": d_loss, "train/d_weight": torch.as_tensor(weight)})
        self.log_dict({**logs, "train/loss": loss}, prog_bar=True)
        return loss

    def _adaptive_weight(self, rec: Tensor, g_loss: Tensor) -> Tensor:
        """LDM's ``calculate_adaptive_weight``: |grad rec| / |grad g_loss| at the decoder's last layer."""
        last = self.model.decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

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
        groups = [{"params": list(self.model.parameters())}]
        if self.discriminator is not None:  # its own group; no gradients (skipped) before disc_start
            groups.append({"params": list(self.discriminator.parameters())})
        return self.optimizer(groups, lr=self.lr)

    # -- export (stedm.callbacks.ExportWeights) --------------------------------------------------
    def export_state_dict(self) -> tuple[dict[str, Tensor], str]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}, "live"

    def export_card(self) -> dict[str, Any]:
        return {"model": {"first_stage": architecture(self.model)}}
