"""First stages: identity, frozen diffusers autoencoders, loading from a local diffusers folder."""

import pytest
import torch
from torch import nn

from stedm.models.first_stage import build_first_stage

SMALL_VQ = dict(block_out_channels=(32, 32, 32), norm_num_groups=8, num_vq_embeddings=16)
SMALL_KL = dict(block_out_channels=(32, 32), norm_num_groups=8, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_identity_is_pixel_space():
    first_stage = build_first_stage("identity")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(first_stage.encode(x), x) and torch.equal(first_stage.decode(x), x)
    assert (first_stage.latent_channels, first_stage.downsample_factor, first_stage.scale_factor) == (3, 1, 1.0)
    with pytest.raises(ValueError, match="identity"):
        build_first_stage("identity", latent_channels=4)


def test_autoencoder_stays_frozen_inside_a_training_parent():
    first_stage = build_first_stage("vq_f4", **SMALL_VQ)
    parent = nn.ModuleDict({"first_stage": first_stage, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in first_stage.modules())
    assert not any(p.requires_grad for p in first_stage.parameters())


def test_kl_first_stage_shapes_and_scale():
    first_stage = build_first_stage("kl", **SMALL_KL, scaling_factor=0.5)
    assert (first_stage.latent_channels, first_stage.downsample_factor, first_stage.scale_factor) == (4, 2, 0.5)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z = first_stage.encode(x)
        assert z.shape == (2, 4, 4, 4)
        # latents are scaled by scale_factor; decode undoes it
        torch.testing.assert_close(first_stage.decode(z), first_stage.model.decode(z / 0.5).sample)


def test_vq_from_local_diffusers_folder(tmp_path):
    source = build_first_stage("vq_f4", **SMALL_VQ)
    source.model.save_pretrained(tmp_path / "vq")
    loaded = build_first_stage("vq_f4", weights_path=str(tmp_path / "vq"))
    for key, value in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert loaded.decode(loaded.encode(x)).shape == x.shape
    with pytest.raises(ValueError, match="diffusers folder"):
        build_first_stage("vq_f4", weights_path=str(tmp_path / "vq"), latent_channels=4)


def test_bad_kind_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        build_first_stage("vq_f8")
    with pytest.raises(FileNotFoundError, match="weights_path"):
        build_first_stage("vq_f4", weights_path=str(tmp_path / "nothing.ckpt"), **SMALL_VQ)
