"""Original LDM checkpoints -> our modules: names/shapes of the real release, exact round trips,
and the converted attention computing what LDM's attention computes."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stedm.models.denoiser import build_denoiser
from stedm.models.first_stage import build_first_stage
from stedm.models.ldm_convert import (
    diffusers_to_ldm_autoencoder,
    ldm_autoencoder_to_diffusers,
    ldm_unet_to_style_unet,
    load_ldm_checkpoint,
    style_unet_to_ldm_unet,
)

DATA = Path(__file__).parent / "data"


def _random_state_dict(tsv: str, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A state dict with exactly the names and shapes listed in a reference key file."""
    state = {}
    for line in (DATA / tsv).read_text().splitlines():
        name, shape = line.split("\t")
        state[name] = torch.randn(tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype=dtype)
    return state


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def vq_f4_state():
    state = _random_state_dict("ldm_vq_f4_keys.tsv")
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)  # training-only, must be ignored
    return state


def test_vq_f4_checkpoint_loads_round_trips_and_codes(vq_f4_state):
    converted = ldm_autoencoder_to_diffusers(vq_f4_state)
    assert converted.skipped == ["loss.discriminator.main.0.weight"]
    with torch.device("meta"):  # skip the random initialisation, the checkpoint replaces it
        first_stage = build_first_stage("vq_f4")
    missing, unexpected = first_stage.model.load_state_dict(converted.state_dict, strict=True, assign=True)
    assert not missing and not unexpected
    back = diffusers_to_ldm_autoencoder(converted.state_dict)
    assert back.skipped == []
    _assert_same(back.state_dict, {k: v for k, v in vq_f4_state.items() if not k.startswith("loss.")})

    image = torch.rand(2, 3, 8, 12) * 2 - 1
    with torch.no_grad():
        z = first_stage.encode(image)
        assert z.shape == (2, 3, 2, 3)
        decoded = first_stage.decode(z)
        assert decoded.shape == (2, 3, 8, 12)
        # decoding quantizes first: snapping z to its nearest codebook entries changes nothing
        codebook = first_stage.model.quantize.embedding.weight
        flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
        snapped = codebook[torch.cdist(flat, codebook).argmin(1)].view(2, 2, 3, 3).permute(0, 3, 1, 2)
        scale = decoded.abs().max().item()  # random weights: large activations, compare relative to them
        torch.testing.assert_close(first_stage.decode(snapped), decoded, rtol=0, atol=1e-4 * scale)
        unquantized = first_stage.model.decode(z, force_not_quantize=True).sample
        assert (unquantized - decoded).abs().max() > 1e-2 * scale


def test_first_stage_from_full_ldm_checkpoint_file(tmp_path):
    small = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, num_vq_embeddings=16)
    source = build_first_stage("vq_f4", **small)
    ldm = diffusers_to_ldm_autoencoder(source.model.state_dict()).state_dict
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.out.2.bias"] = torch.zeros(3)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": full, "global_step": 1}, path)
    assert load_ldm_checkpoint(path).keys() == full.keys()

    loaded = build_first_stage("vq_f4", weights_path=str(path), **small)
    _assert_same(loaded.model.state_dict(), source.model.state_dict())
    assert (loaded.latent_channels, loaded.downsample_factor, loaded.scale_factor) == (3, 4, 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        build_first_stage("vq_f4", weights_path=str(path), **{**small, "num_vq_embeddings": 32})


def test_landscape_checkpoint_loads_into_paper_unet_and_round_trips():
    ldm = _random_state_dict("ldm_landscape_unet_keys.tsv", dtype=torch.bfloat16)  # half the memory
    full = {**ldm, "cond_stage_model.channel_mapper.weight": torch.randn(3, 182, 1, 1),
            "first_stage_model.quant_conv.bias": torch.randn(3)}
    converted = ldm_unet_to_style_unet(full)
    assert sorted(converted.skipped) == ["cond_stage_model.channel_mapper.weight", "first_stage_model.quant_conv.bias"]

    with torch.device("meta"):
        unet = build_denoiser("paper")
    missing, unexpected = unet.load_state_dict(converted.state_dict, strict=False, assign=True)  # checks shapes
    assert not unexpected
    assert missing and all(k.startswith("style_block.") for k in missing)

    back = style_unet_to_ldm_unet(converted.state_dict)
    _assert_same(back.state_dict, ldm)


def test_load_ldm_weights_reports_the_style_block_and_rejects_other_architectures():
    model = build_denoiser("tiny", style_injection="add")
    ldm = style_unet_to_ldm_unet(model.state_dict(), num_levels=2, layers_per_block=1, attention_heads=2)
    assert ldm.skipped and all(k.startswith("style_block.") for k in ldm.skipped)

    fresh = build_denoiser("tiny", style_injection="add")
    style_before = {k: v.clone() for k, v in fresh.style_block.state_dict().items()}
    fresh.load_ldm_weights(ldm.state_dict)
    for key, value in model.unet.state_dict().items():
        assert torch.equal(fresh.unet.state_dict()[key], value), key
    _assert_same(fresh.style_block.state_dict(), style_before)

    wider = build_denoiser("tiny", block_out_channels=(32, 128))
    with pytest.raises(ValueError, match="shape mismatch"):
        wider.load_ldm_weights(ldm.state_dict)


def _ldm_attention_block(x, params, heads, groups):
    """LDM's AttentionBlock with the (default) legacy QKV order, written from its definition."""
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(F.group_norm(x, groups, params["norm.weight"], params["norm.bias"]),
                   params["qkv.weight"], params["qkv.bias"])
    ch = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weights = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    out = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, -1)
    return (x + F.conv1d(out, params["proj_out.weight"], params["proj_out.bias"])).reshape(b, c, *spatial)


def test_converted_middle_attention_computes_ldm_attention():
    model = build_denoiser("tiny")  # middle: 64 channels, 2 heads, 8 groups
    prefix = "model.diffusion_model.middle_block.1."
    ldm = style_unet_to_ldm_unet(model.state_dict(), num_levels=2, layers_per_block=1, attention_heads=2).state_dict
    for key in [k for k in ldm if k.startswith(prefix)]:
        ldm[key] = torch.randn_like(ldm[key]) * 0.3
    model.load_ldm_weights(ldm)
    x = torch.randn(2, 64, 4, 4)
    params = {k.removeprefix(prefix): v for k, v in ldm.items() if k.startswith(prefix)}
    with torch.no_grad():
        torch.testing.assert_close(model.unet.mid_block.attentions[0](x), _ldm_attention_block(x, params, 2, 8))


def test_timestep_embedding_matches_ldm():
    model = build_denoiser("tiny")
    t = torch.tensor([0, 1, 500, 999])
    half = model.unet.config.block_out_channels[0] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t[:, None].float() * freqs
    torch.testing.assert_close(model.unet.time_proj(t), torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
