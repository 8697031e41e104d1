"""The segmentation LightningModule shared by every segmenter of the project.

Generic over network, loss and optimizer: ``train_seg.py`` gives it an smp U-Net with
:class:`~stedm.losses.segmentation.SegmentationLoss`, ``finetune_ssl.py`` a diffusion-pretrained
U-Net with focal + structural-similarity loss. Training runs on patches; validation and test on
whole images (batch size 1 is typical, any batch of equal-sized images works) through the one
:class:`~stedm.evaluation.Evaluator`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from stedm.data.contract import IGNORE_INDEX
from stedm.evaluation import Evaluator, check_window
from stedm.losses.segmentation import crop_border

WINDOW_KEYS = ("data.patch_size", "data.eval_overlap", "data.border_crop")
"""The config keys the Segmenter's ``window``, ``overlap`` and ``border_crop`` come from
(conf/train_seg.yaml, conf/finetune_ssl.yaml), named when their geometry is refused."""


class Segmenter(pl.LightningModule):
    """Train a segmentation network on patches, evaluate it on stitched whole images.

    Args:
        net: maps images ``B x 3 x H x W`` in ``[-1, 1]`` to logits ``B x num_classes x H x W``.
        loss: ``loss(logits, mask) -> scalar``; must ignore :data:`IGNORE_INDEX` pixels.
        optimizer: partial taking ``params`` and ``lr`` (Hydra ``_partial_: true``).
        lr: learning rate (already scaled by batch size and devices, if wanted).
        num_classes: number of classes (2 when ``binary``).
        window: sliding-window size at evaluation (the training patch size).
        overlap: sliding-window overlap in pixels.
        class_names: names for per-class metrics.
        scheduler: optional partial taking ``optimizer``; stepped every ``scheduler_interval``
            (``"epoch"`` or ``"step"``); ``ReduceLROnPlateau`` watches ``val/loss``.
        border_crop: pixels cropped on each side of logits and mask before the training loss
            (the paper crops the tiling overlap). Evaluation never crops; it reflect-pads each
            image by ``border_crop`` so window borders the network never learnt do not
            predict image borders alone.
        binary: map every mask id > 0 to 1 (background vs. any foreground, the paper's setting)
            before loss and metrics.
        include_background_in_mean: whether class 0 enters the class means.
        spatial_metrics: compute HD, HD95, AJI and object Dice at test time.
        weighting: sliding-window blending, ``"gaussian"`` or ``"uniform"``.
        window_batch_size: windows per forward pass at evaluation.
        output_dir: where the test metrics go (default ``trainer.default_root_dir``).

    Logs ``train/loss``, ``val/loss`` and ``val/<metric>`` (e.g. ``val/iou_fg``), and at the
    end of a test ``test/<metric>``, ``metrics_{tag}.json`` and ``per_case_{tag}.csv`` where
    ``tag`` is :attr:`test_tag` (set it to ``"last"`` / ``"best"`` before ``trainer.test``).
    """

    compile_targets = ("net",)  # compiled in place by location.compile (stedm.run.maybe_compile)

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr: float,
        num_classes: int,
        window: int,
        overlap: int = 0,
        class_names: Sequence[str] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        border_crop: int = 0,
        binary: bool = False,
        include_background_in_mean: bool = False,
        spatial_metrics: bool = True,
        weighting: str = "gaussian",
        window_batch_size: int = 8,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        if binary and num_classes != 2:
            raise ValueError(f"binary=True segments background vs. foreground: num_classes must be 2, got {num_classes}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got '{scheduler_interval}'")
        check_window(window, overlap, border_crop, names=WINDOW_KEYS)  # at construction, before training
        self.save_hyperparameters(ignore=["net", "loss"], logger=False)
        self.net = net
        self.loss = loss
        names = list(class_names) if class_names is not None else None
        evaluator_args = {"num_classes": num_classes, "window": window, "overlap": overlap, "class_names": names,
                          "include_background_in_mean": include_background_in_mean, "weighting": weighting,
                          "window_batch_size": window_batch_size, "margin": border_crop}
        self.val_evaluator = Evaluator(spatial_metrics=False, **evaluator_args)
        self.test_evaluator = Evaluator(spatial_metrics=spatial_metrics, **evaluator_args)
        self.test_tag = "test"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def target(self, mask: torch.Tensor) -> torch.Tensor:
        """The mask the loss and metrics see (foreground merged when ``binary``)."""
        if not self.hparams.binary:
            return mask
        return torch.where((mask > 0) & (mask != IGNORE_INDEX), torch.ones_like(mask), mask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        crop = self.hparams.border_crop
        logits = self.net(batch["image"])
        loss = self.loss(crop_border(logits, crop), crop_border(self.target(batch["mask"]), crop))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(logits))
        return loss

    # -- evaluation ---------------------------------------------------------------------------
    def _evaluation_step(self, batch: dict[str, Any], evaluator: Evaluator, stage: str) -> torch.Tensor:
        batch = {**batch, "mask": self.target(batch["mask"])}
        logits = evaluator.update(self.net, batch)
        loss = self.loss(logits, batch["mask"])
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(logits))
        return loss

    def _log_result(self, evaluator: Evaluator, stage: str):
        result = evaluator.compute()  # gathers all ranks: identical values everywhere
        self.log_dict({f"{stage}/{k}": float(v) for k, v in result.metrics.items()}, sync_dist=True)
        return result

    def on_validation_epoch_start(self) -> None:
        self.val_evaluator.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluation_step(batch, self.val_evaluator, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_result(self.val_evaluator, "val")

    def on_test_epoch_start(self) -> None:
        self.test_evaluator.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluation_step(batch, self.test_evaluator, "test")

    def on_test_epoch_end(self) -> None:
        result = self._log_result(self.test_evaluator, "test")
        if self.trainer.is_global_zero:
            output_dir = Path(self.hparams.output_dir or self.trainer.default_root_dir)
            metrics_path, cases_path = result.save(output_dir, self.test_tag)
            print(f"\nTest metrics ({self.test_tag}), {metrics_path} and {cases_path}:\n{result.summary()}")

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.hparams.optimizer(params=params, lr=self.hparams.lr)
        if self.hparams.scheduler is None:
            return optimizer
        scheduler = self.hparams.scheduler(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": scheduler, "interval": self.hparams.scheduler_interval, "monitor": "val/loss"}}
