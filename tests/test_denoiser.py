"""StyleUNet: paper preset size and structure, style paths, tiny forward/backward."""

import math
from pathlib import Path

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D

from stedm.models.denoiser import StyleCrossAttention, build_denoiser

LANDSCAPE_KEYS = Path(__file__).parent / "data" / "ldm_landscape_unet_keys.tsv"


def _landscape_parameter_count() -> int:
    rows = (line.rstrip("\n").split("\t") for line in LANDSCAPE_KEYS.read_text().splitlines())
    return sum(math.prod(int(d) for d in shape.strip("()").split(",") if d.strip()) for _, shape in rows)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def paper_unet():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return build_denoiser("paper")


def test_paper_preset_has_ldm_size_plus_style_block(paper_unet):
    total = _count(paper_unet)
    assert abs(total - 234.6e6) / 234.6e6 < 0.01
    assert total == _landscape_parameter_count() + _count(paper_unet.style_block)


def test_paper_preset_structure(paper_unet):
    unet = paper_unet.unet
    assert tuple(unet.config.block_out_channels) == (128, 512, 1024) and unet.config.layers_per_block == 2
    assert all(type(b) is DownBlock2D for b in unet.down_blocks)  # res blocks only, no attention
    assert all(type(b) is UpBlock2D for b in unet.up_blocks)
    (attention,) = unet.mid_block.attentions
    assert attention.heads == 8 and attention.inner_dim == 1024
    assert unet.time_embedding.linear_2.out_features == 512
    style_block = paper_unet.style_block
    assert isinstance(style_block, ResnetBlock2D) and style_block.time_emb_proj.in_features == 512


@pytest.mark.parametrize("injection", ["add", "cross_attention"])
def test_style_enters_after_first_middle_res_block(injection):
    model = build_denoiser("tiny", style_injection=injection)
    mid = model.unet.mid_block
    order = []
    for name, module in [("res0", mid.resnets[0]), ("style", model.style_block), ("attn", mid.attentions[0]),
                         ("res1", mid.resnets[1])]:
        module.register_forward_hook(lambda *_, name=name: order.append(name))
    model(torch.randn(1, 6, 16, 16), torch.tensor([10]), torch.randn(1, 512))
    assert order == ["res0", "style", "attn", "res1"]


@pytest.mark.parametrize("injection", ["add", "cross_attention"])
def test_style_changes_the_prediction_and_trains(injection):
    model = build_denoiser("tiny", style_injection=injection)
    if injection == "cross_attention":
        assert isinstance(model.style_block, StyleCrossAttention)
    x, t = torch.randn(2, 6, 16, 16), torch.tensor([1, 900])
    style = torch.randn(2, 512)
    out = model(x, t, style)
    assert out.shape == (2, 3, 16, 16)
    assert not torch.allclose(out, model(x, t, torch.randn(2, 512)))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.style_block.parameters())


@pytest.mark.parametrize("injection", ["add", "cross_attention"])
def test_forward_guided_equals_two_forward_passes(injection):
    unet = build_denoiser("tiny", style_dim=16, style_injection=injection).eval()
    x, t = torch.randn(2, 6, 16, 16), torch.tensor([10, 700])
    style, null = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        cond, uncond = unet.forward_guided(x, t, style, null)
        torch.testing.assert_close(cond, unet(x, t, style), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(uncond, unet(x, t, null), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(cond, uncond)
    with pytest.raises(ValueError, match="style must be"):
        unet.forward_guided(x, t, style, null[:1])
    with pytest.raises(ValueError, match="needs a style path"):
        build_denoiser("tiny", style_injection=None).forward_guided(x, t, style, null)


def test_no_style_injection_has_no_style_parameters():
    model = build_denoiser("tiny", style_injection=None)
    assert model.style_block is None
    assert not [name for name, _ in model.named_parameters() if "style" in name]
    out = model(torch.randn(2, 6, 16, 16), torch.tensor([5, 6]), None)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP: no unused parameters
    with pytest.raises(ValueError, match="no style path"):
        model(torch.randn(2, 6, 16, 16), torch.tensor([5, 6]), torch.randn(2, 512))


def test_tiny_forward_backward_and_timestep_forms():
    model = build_denoiser("tiny", in_channels=4, out_channels=2, style_dim=16)
    x, style = torch.randn(3, 4, 16, 16, requires_grad=True), torch.randn(3, 16)
    out = model(x, torch.tensor([0, 10, 999]), style)
    assert out.shape == (3, 2, 16, 16)
    out.mean().backward()
    assert x.grad.shape == x.shape
    # a scalar timestep and float timesteps are accepted and mean the same thing
    torch.testing.assert_close(model(x, 7, style), model(x, torch.full((3,), 7.0), style))


def test_bad_inputs_are_rejected():
    model = build_denoiser("tiny")
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, 6, 15, 16), torch.tensor([1]), torch.randn(1, 512))
    with pytest.raises(ValueError, match="needs a style vector"):
        model(torch.randn(1, 6, 16, 16), torch.tensor([1]), None)
    with pytest.raises(ValueError, match="style_injection"):
        build_denoiser("tiny", style_injection="concat")
    with pytest.raises(ValueError, match="preset"):
        build_denoiser("huge")


def test_gradient_checkpointing_gives_the_same_result():
    plain = build_denoiser("tiny")
    checkpointed = build_denoiser("tiny", gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, style = torch.randn(2, 6, 16, 16), torch.tensor([3, 4]), torch.randn(2, 512)
    torch.testing.assert_close(checkpointed(x, t, style), plain(x, t, style))
