"""One label space, one key: ``data.binary_layout`` decides the diffusion layout, the masks of
the pairs predict_diff writes and what their settings record; train_seg refuses a ``*_syn``
entry drawn in another label space than the real entry's, naming both."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from stedm.data.datamodule import StedmDataModule
from stedm.data.pair_folder import SETTINGS
from stedm.tasks.predict import settings_of

from conftest import write_synthetic_pairs


def syn_folder(root, layout_classes):
    folder = write_synthetic_pairs(root / "data" / "syn_data" / f"pairs{layout_classes}", n=3, size=32)
    (folder / SETTINGS).write_text(json.dumps({"layout_classes": layout_classes, "num_classes": 3}))
    return folder


def syn_datamodule(compose_cfg, folder, *extra):
    cfg = compose_cfg("train_seg", ["preset=tiny", "data/dataset=[demo_anno,demo_syn]", "data.ratios=[0.5,0.5]",
                                    f"data.dataset.demo_syn.folder_name={folder.name}", "data.patch_size=32",
                                    *extra])
    return StedmDataModule(cfg.data, batch_size=2, eval_splits=())


def test_train_seg_refuses_pairs_drawn_in_another_label_space_naming_both(compose_cfg, tmp_path):
    binary = syn_folder(tmp_path, 2)  # pairs of a binary layout beside the demo's 3-class masks
    with pytest.raises(ValueError) as err:
        syn_datamodule(compose_cfg, binary)
    message = str(err.value)
    assert "'demo_syn'" in message and "'demo_anno'" in message and str(binary) in message
    assert "2-class layout" in message and "3 classes" in message and "data.binary_layout" in message
    # the same label space passes; so does a binary segmenter, which merges both to background/foreground
    assert len(syn_datamodule(compose_cfg, syn_folder(tmp_path, 3)).train_sets) == 2
    assert len(syn_datamodule(compose_cfg, binary, "segmenter.binary=true", "segmenter.classes=2").train_sets) == 2


def test_paper_settings_stay_binary_and_the_demo_layout_has_its_three_classes(compose_cfg):
    for data in ("her2", "catch", "flowers"):
        cfg = compose_cfg("train_diff", [f"data={data}", "preset=paper"])
        assert cfg.data.binary_layout is True and cfg.model.binary_layout is True
        assert cfg.model.layout_encoder.num_classes == 2
    demo = compose_cfg("train_diff", ["preset=tiny"])
    assert demo.data.binary_layout is False and demo.model.layout_encoder.num_classes == demo.data.num_classes == 3


def test_a_three_class_layout_reaches_the_denoiser(compose_cfg):
    cfg = compose_cfg("train_diff", ["preset=tiny", "location.precision=32-true"])
    model = instantiate(cfg.model, lr=1e-4)
    seen = []
    model.denoiser.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    size = int(cfg.data.patch_size)
    hematoxylin = torch.ones(1, size, size, dtype=torch.long)
    image = torch.zeros(1, 3, size, size)
    style = torch.zeros(1, int(cfg.style_sampling.num_images), 3, size, size)
    for mask in (hematoxylin, 2 * hematoxylin):  # class 1 vs class 2 everywhere: same binary layout
        torch.manual_seed(0)
        model.training_step({"image": image, "mask": mask, "style": style}, 0)
    layout = slice(model.first_stage.latent_channels, None)
    assert seen[0].shape[1] == model.first_stage.latent_channels + cfg.model.layout_encoder.out_channels
    assert not torch.allclose(seen[0][:, layout], seen[1][:, layout])  # the denoiser tells the classes apart
    torch.testing.assert_close(seen[0][:, :layout.start], seen[1][:, :layout.start])  # same noise


def test_pair_masks_and_settings_follow_the_models_layout(compose_cfg, tmp_path):
    cfg = compose_cfg("train_diff", ["preset=tiny", "data.binary_layout=true"])
    model = instantiate(cfg.model, lr=1e-4)
    mask = torch.tensor([[[0, 1, 2, 255]]])
    assert model.layout_classes(mask).tolist() == [[[0, 1, 1, 0]]]  # what seg_*.png holds: the layout's ids
    checkpoint = tmp_path / "x.ckpt"
    checkpoint.write_bytes(b"0")
    predict = compose_cfg("predict_diff", ["preset=tiny", "style_sampling=augmented", "+predict_dir=p"])
    settings = settings_of(predict, checkpoint, model.layout_channels)
    assert settings["layout_classes"] == 2 and settings["class_names"] == ["background", "foreground"]
