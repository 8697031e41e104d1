"""The GenSelfDiff-HIS U-Net: architecture of docs/method.md, 2 GenSelfDiff-HIS, head replacement, pretrained loading."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from stedm.models.cards import card_path, read_card
from stedm.models.ssl_unet import (
    LEGACY_FORMAT,
    LinearAttention,
    SSLSegmentationNet,
    build_ssl_segmenter,
    build_ssl_unet,
    load_pretrained_unet,
    save_pretrained_unet,
)


@pytest.fixture(scope="module")
def paper_unet():
    torch.manual_seed(0)
    return build_ssl_unet("default")


def test_default_preset_has_the_papers_structure_and_size(paper_unet):
    net = paper_unet
    assert (net.stem.kernel_size, net.stem.out_channels) == ((7, 7), 42)
    assert (net.time_embedding.linear_1.in_features, net.time_embedding.linear_2.out_features) == (64, 256)
    assert [level.res2.conv2.out_channels for level in net.down_levels] == [64, 128, 256, 512]
    for i, level in enumerate(net.down_levels):
        assert isinstance(level.attn, LinearAttention) and (level.attn.heads, level.attn.head_dim) == (4, 32)
        assert [n.num_groups for n in (level.res1.norm1, level.res2.norm2)] == [8, 8]
        if i < 3:
            assert (level.downsample.kernel_size, level.downsample.stride) == ((4, 4), (2, 2))
        else:
            assert isinstance(level.downsample, nn.Identity)
    assert isinstance(net.mid_attn, Attention) and net.mid_attn.heads == 4
    # three up stages 512->256, 256->128, 128->64, each concatenating the skip of its level
    assert [(up.res1.conv1.in_channels, up.res2.conv2.out_channels) for up in net.up_levels] == [
        (1024, 256), (512, 128), (256, 64)]
    assert all(isinstance(up.attn, LinearAttention) and up.upsample.stride == (2, 2) for up in net.up_levels)
    assert net.head.res.time_proj is None and net.head.out.kernel_size == (1, 1)
    params = sum(p.numel() for p in net.parameters())
    assert abs(params - 31.27e6) <= 0.005 * 31.27e6, params


def test_default_levels_run_at_full_to_eighth_resolution_and_top_skip_is_unused(paper_unet):
    sizes, concatenated = [], []
    hooks = [level.register_forward_hook(lambda m, i, o: sizes.append(o[0].shape[-1]))
             for level in paper_unet.down_levels]
    hooks += [up.res1.register_forward_pre_hook(lambda m, i: concatenated.append(i[0].shape[1:]))
              for up in paper_unet.up_levels]
    with torch.no_grad():
        out = paper_unet(torch.randn(1, 3, 32, 32), torch.tensor([10]))
    for hook in hooks:
        hook.remove()
    assert out.shape == (1, 3, 32, 32)
    assert sizes == [32, 16, 8, 4]  # each level halves: 256 -> 32 px at the paper's patch size
    # skips of levels 4, 3, 2 (with the up path) are concatenated; the 64-channel full-resolution one never
    assert concatenated == [(1024, 4, 4), (512, 8, 8), (256, 16, 16)]


def test_time_embedding_is_the_original_sinusoid(paper_unet):
    t = torch.tensor([0, 7, 999])
    half = 32
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / (half - 1))
    expected = torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], dim=1)
    torch.testing.assert_close(paper_unet.time_proj(t), expected)


def test_tiny_preset_forward_shapes_and_size_check():
    net = build_ssl_unet("tiny")
    x = torch.randn(2, 3, 32, 16)
    assert net(x, torch.tensor([3, 500])).shape == (2, 3, 32, 16)
    assert net(x, 0).shape == (2, 3, 32, 16)  # a scalar timestep is broadcast
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 3, 30, 32), 0)
    with pytest.raises(ValueError, match="unknown SSLUNet preset"):
        build_ssl_unet("huge")


def test_replace_head_keeps_every_other_weight():
    net = build_ssl_unet("tiny")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.replace_head(5)
    after = net.state_dict()
    head = [k for k in after if k.startswith(net.head_prefixes())]
    assert head and all(k.startswith("head.") for k in head)
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in head)
    assert not torch.equal(after["head.res.conv1.weight"], before["head.res.conv1.weight"])  # re-initialised
    assert net(torch.randn(1, 3, 16, 16), 0).shape == (1, 5, 16, 16) and net.config["out_channels"] == 5


def test_load_backbone_leaves_only_the_head_missing():
    pretrained = build_ssl_unet("tiny")
    target = build_ssl_unet("tiny")
    target.replace_head(2)
    missing = target.load_backbone(pretrained.state_dict())
    assert missing and all(k.startswith("head.") for k in missing)
    for k, v in pretrained.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(target.state_dict()[k], v)
    broken = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("mid_attn.")}
    with pytest.raises(ValueError, match="missing"):
        target.load_backbone(broken)


def test_build_ssl_segmenter_from_file_and_from_scratch(tmp_path):
    pretrained = build_ssl_unet("tiny")
    path = tmp_path / "pretrained_unet.pt"
    save_pretrained_unet(path, pretrained.config, pretrained.state_dict())
    segmenter = build_ssl_segmenter(3, preset="tiny", pretrained_path=path)
    assert isinstance(segmenter, SSLSegmentationNet) and segmenter.num_classes == 3
    state = segmenter.unet.state_dict()
    for k, v in pretrained.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(state[k], v), k
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    logits = segmenter(image)
    assert logits.shape == (2, 3, 16, 16)
    torch.testing.assert_close(logits, segmenter.unet(image, torch.zeros(2)))  # constant t = 0
    scratch = build_ssl_segmenter(3, preset="tiny", from_scratch=True)
    assert scratch.unet.config == segmenter.unet.config


def test_build_ssl_segmenter_refuses_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="not both and not neither"):
        build_ssl_segmenter(2, preset="tiny")
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=f"pretrained={missing}: no such file.*pretrain_ssl.py"):
        build_ssl_segmenter(2, preset="tiny", pretrained_path=missing)
    other = build_ssl_unet("tiny", dim=8)
    save_pretrained_unet(tmp_path / "other.pt", other.config, other.state_dict())
    with pytest.raises(ValueError, match="pretrained=.*other.pt was pretrained with a different architecture"):
        build_ssl_segmenter(2, preset="tiny", pretrained_path=tmp_path / "other.pt")
    with pytest.raises(ValueError, match="pretrained_weights=best is unknown; choose one of ema, live"):
        build_ssl_segmenter(2, preset="tiny", from_scratch=True, pretrained_weights="best")


def test_files_that_are_not_an_export_name_the_pretrained_key_the_file_and_what_is_expected(tmp_path):
    """Issue 14: a text file gave IndexError('pop from empty list'), a training checkpoint torch's
    raw weights-only message, and both named pretrained_path, which no user types."""
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    from omegaconf import OmegaConf

    trained = tmp_path / "last.ckpt"  # as a train_diff checkpoint: Lightning keys and a config object
    torch.save({"pytorch-lightning_version": "2.5", "state_dict": {"w": torch.zeros(1)},
                "hyper_parameters": OmegaConf.create({"lr": 1.0})}, trained)
    plain = tmp_path / "plain.ckpt"  # a checkpoint that weights_only reads, but no export
    torch.save({"pytorch-lightning_version": "2.5", "state_dict": {"w": torch.zeros(1)}}, plain)
    expected = "expected the pretrained_unet.pt that pretrain_ssl.py writes into its run directory"
    for path, what in ((text, "is not a pretrained SSL U-Net file"), (trained, "is not a pretrained SSL U-Net file"),
                       (plain, "is a Lightning training checkpoint")):
        with pytest.raises(ValueError) as raised:
            build_ssl_segmenter(2, preset="tiny", pretrained_path=path)
        message = str(raised.value)
        assert message.startswith(f"pretrained={path} {what}") and expected in message, message
        assert "pretrained_path" not in message


def test_export_holds_ema_and_live_weights_and_fine_tuning_chooses(tmp_path, caplog):
    torch.manual_seed(0)
    ema, live = build_ssl_unet("tiny"), build_ssl_unet("tiny")
    path = tmp_path / "pretrained_unet.pt"
    save_pretrained_unet(path, ema.config, ema.state_dict(), live=live.state_dict())
    for name, source in (("ema", ema), ("live", live)):
        config, state = load_pretrained_unet(path, name)
        assert config == source.config and all(torch.equal(state[k], v) for k, v in source.state_dict().items())
        chosen = build_ssl_segmenter(2, preset="tiny", pretrained_path=path, pretrained_weights=name).unet.state_dict()
        assert all(torch.equal(chosen[k], v) for k, v in source.state_dict().items() if not k.startswith("head."))
    assert build_ssl_segmenter(2, preset="tiny", pretrained_path=path).unet.mid_res1.conv1.weight.equal(
        ema.mid_res1.conv1.weight)  # ema by default
    assert not ema.mid_res1.conv1.weight.equal(live.mid_res1.conv1.weight)

    # an older export: one state_dict (the EMA) under the old format reads as before, with a log line
    old = tmp_path / "old_pretrained_unet.pt"
    torch.save({"format": LEGACY_FORMAT, "config": ema.config, "state_dict": ema.state_dict()}, old)
    with caplog.at_level("INFO", logger="stedm.models.ssl_unet"):
        _, state = load_pretrained_unet(old)
    assert all(torch.equal(state[k], v) for k, v in ema.state_dict().items())
    assert f"pretrained={old} holds one weight set (ema, an older export)" in caplog.text
    with pytest.raises(ValueError, match="holds only the ema weights.*use pretrained_weights=ema"):
        build_ssl_segmenter(2, preset="tiny", pretrained_path=old, pretrained_weights="live")


def test_safetensors_export_holds_both_sets_with_a_card_and_refuses_a_changed_copy(tmp_path):
    torch.manual_seed(0)
    ema, live = build_ssl_unet("tiny"), build_ssl_unet("tiny")
    path = tmp_path / "pretrained_unet.safetensors"
    save_pretrained_unet(path, ema.config, ema.state_dict(), live=live.state_dict())
    card = read_card(path)
    assert card["model"]["ssl_unet"] == ema.config and card["weight_sets"] == ["ema", "live"]
    for name, source in (("ema", ema), ("live", live)):
        config, state = load_pretrained_unet(path, name)
        assert config == source.config and state.keys() == source.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    chosen = build_ssl_segmenter(2, preset="tiny", pretrained_path=path, pretrained_weights="live").unet
    assert chosen.mid_res1.conv1.weight.equal(live.mid_res1.conv1.weight)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"pretrained=.*sha256 differs"):
        load_pretrained_unet(path)
    card_path(path).unlink()
    with pytest.raises(ValueError, match=r"pretrained=.* no model card describing an SSL U-Net .*missing"):
        load_pretrained_unet(path)
