"""The Segmenter trains, validates and tests end to end with a real Lightning Trainer on CPU."""

import functools
import json

import pandas as pd
import pytest
import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from stedm.data.contract import IGNORE_INDEX
from stedm.losses.segmentation import SegmentationLoss, crop_border
from stedm.modules.segmentation import Segmenter


class Shapes(Dataset):
    """Bright squares (class 1) and bars (class 2) on a dark noisy background, as contract samples.

    ``unlabelled`` marks a band of every mask unlabelled.
    """

    def __init__(self, count: int, height: int, width: int, seed: int, unlabelled: bool = False, repeat: int = 1):
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for index in range(count):
            image = torch.full((3, height, width), -0.8) + 0.1 * torch.randn(3, height, width, generator=generator)
            mask = torch.zeros(height, width, dtype=torch.int64)
            top = int(torch.randint(0, height - 20, (1,), generator=generator))  # clear of the bar
            left = int(torch.randint(0, width - 12, (1,), generator=generator))
            image[:, top:top + 10, left:left + 10] = 0.8
            mask[top:top + 10, left:left + 10] = 1
            image[:, height - 8:height - 5, 2:width // 2] = 0.8
            mask[height - 8:height - 5, 2:width // 2] = 2
            if unlabelled:
                mask[12:15] = IGNORE_INDEX
            meta = {"source": "shapes", "case": f"patient{index % 2}", "index": index, "subtype": f"s{index % 2}"}
            self.items.append({"image": image, "mask": mask, "labelled": True, "meta": meta})
        self.repeat = repeat

    def __len__(self):
        return len(self.items) * self.repeat

    def __getitem__(self, index):
        return self.items[index % len(self.items)]


def tiny_unet():
    return smp.Unet(encoder_name="tu-resnet10t", encoder_depth=3, decoder_channels=(32, 16, 8),
                    encoder_weights=None, classes=2)


@pytest.fixture
def one_thread():
    """A tiny model on a shared 2-core machine: threading overhead would dominate the run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_segmenter_overfits_and_writes_test_metrics(tmp_path, capsys, one_thread):
    pl.seed_everything(0)
    epochs, steps_per_epoch = 5, 15
    module = Segmenter(
        net=tiny_unet(),
        loss=SegmentationLoss(),
        optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.0),
        lr=1e-2,
        scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-2,
                                    total_steps=epochs * steps_per_epoch),
        scheduler_interval="step",
        num_classes=2,
        class_names=["background", "tissue"],
        window=32,
        overlap=8,
        border_crop=2,
        binary=True,
        output_dir=str(tmp_path),
    )
    shapes = Shapes(4, 32, 32, seed=1, unlabelled=True, repeat=steps_per_epoch)
    train = DataLoader(shapes, batch_size=4, shuffle=True)
    # the same four images, whole, one per batch (evaluation pads them by the border crop
    # and stitches overlapping windows)
    whole = DataLoader(Subset(shapes, range(4)), batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, train, whole)
    assert trainer.callback_metrics["val/iou_fg"] > 0.93

    module.test_tag = "last"
    (results,) = trainer.test(module, whole)
    assert results["test/iou_fg"] > 0.93
    metrics = json.loads((tmp_path / "metrics_last.json").read_text())
    assert metrics["n_units"] == 4 and metrics["n_cases"] == 2
    assert metrics["iou/tissue"] == pytest.approx(metrics["iou_fg"])  # binary: foreground = class 1
    assert {"hd95", "aji", "case_iou_fg_var", "subtype_recall_fg_var"} <= metrics.keys()
    cases = pd.read_csv(tmp_path / "per_case_last.csv")
    assert cases["case"].tolist() == ["patient0", "patient1"] and (cases["n_units"] == 2).all()
    assert (cases["iou_fg"] > 0.9).all()
    assert "iou_fg" in capsys.readouterr().out


def test_segmenter_builds_from_a_hydra_config():
    cfg = OmegaConf.create({
        "_target_": "stedm.modules.segmentation.Segmenter",
        "net": {"_target_": "segmentation_models_pytorch.Unet", "encoder_name": "tu-resnet10t", "encoder_depth": 3,
                "decoder_channels": [32, 16, 8], "encoder_weights": None, "classes": 2},
        "loss": {"_target_": "stedm.losses.segmentation.SegmentationLoss", "dice_classes": [1]},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 0.01},
        "lr": 1e-3, "num_classes": 2, "class_names": ["background", "tumour"], "window": 32, "overlap": 8,
    })
    module = instantiate(cfg)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.01
    logits = module(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 2, 32, 32)
    assert module.loss(logits, torch.ones(1, 32, 32, dtype=torch.long)).item() > 0


def test_binary_requires_two_classes():
    with pytest.raises(ValueError, match="num_classes must be 2"):
        Segmenter(net=tiny_unet(), loss=SegmentationLoss(), optimizer=torch.optim.AdamW, lr=1e-3,
                  num_classes=3, window=32, binary=True)


def test_loss_ignores_unlabelled_pixels_and_crops_borders():
    loss = SegmentationLoss()
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    unlabelled = torch.full_like(target, IGNORE_INDEX)
    # an unlabelled sample changes nothing: same loss as the labelled sample alone
    both = loss(logits, torch.stack([target[0], unlabelled[1]]))
    assert float(both) == pytest.approx(float(loss(logits[:1], target[:1])), rel=1e-5)
    # only unlabelled pixels: zero loss that still back-propagates
    logits.requires_grad_(True)
    nothing = loss(logits, unlabelled)
    nothing.backward()
    assert nothing.item() == 0.0 and logits.grad is not None
    # perfect, confident logits: CE ~ 0 and foreground Dice ~ 1
    perfect = 50.0 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert float(loss(perfect, target)) == pytest.approx(0.0, abs=1e-4)
    assert crop_border(torch.zeros(2, 3, 8, 10), 2).shape == (2, 3, 4, 6)
    with pytest.raises(ValueError, match="border_crop"):
        crop_border(torch.zeros(1, 8, 8), 4)
