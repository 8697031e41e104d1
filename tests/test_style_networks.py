"""Style encoder, aggregators, StyleExtractor and layout encoder on tiny shapes."""

import pytest
import torch
import torch.nn.functional as F

from stedm.models.layout import LayoutEncoder
from stedm.models.style import (
    NULL_STYLE_VALUE,
    LinearAggregator,
    LocalitySelfAttention,
    MaxAggregator,
    MeanAggregator,
    SetViTAggregator,
    StyleExtractor,
    build_style_encoder,
    null_style_like,
)

TINY_BACKBONE = "timm:test_resnet"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_null_style_is_constant_outside_data_range():
    style = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    null = null_style_like(style)
    assert null.shape == style.shape and null.dtype == style.dtype
    assert NULL_STYLE_VALUE == -2.0 and torch.all(null == -2.0)


def test_mean_and_max_follow_their_definition():
    emb = torch.randn(2, 5, 16)
    assert torch.equal(MeanAggregator()(emb), emb.mean(dim=1))
    assert torch.equal(MaxAggregator()(emb), emb.max(dim=1).values)


def test_linear_aggregator_uses_every_image_and_checks_count():
    agg = LinearAggregator(num_images=3, dim=16)
    assert [type(m).__name__ for m in agg.mlp] == ["ReLU", "Linear", "ReLU", "Linear", "ReLU"]
    assert agg.mlp[1].in_features == 48 and agg.mlp[3].out_features == 16
    # positive inputs keep the leading ReLU from hiding a change
    emb = torch.rand(2, 3, 16) + 0.1
    out = agg(emb)
    assert out.shape == (2, 16)
    for i in range(3):
        changed = emb.clone()
        changed[:, i] += 1.0
        assert not torch.allclose(agg(changed), out), f"output ignores style image {i}"
    with pytest.raises(ValueError, match="num_images"):
        agg(torch.rand(2, 4, 16))


def test_locality_self_attention_masks_the_diagonal():
    attn = LocalitySelfAttention(dim=8, heads=2, dim_head=4)
    with torch.no_grad():
        attn.log_temperature.fill_(0.3)  # not the initial value: the temperature must be used
    x = torch.randn(2, 5, 8)
    q, k, v = attn.to_qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * torch.exp(torch.tensor(0.3))
    scores = scores.masked_fill(torch.eye(5, dtype=torch.bool), float("-inf"))
    expected = attn.to_out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), expected)


def test_set_vit_shape_and_every_image_matters():
    agg = SetViTAggregator(num_images=3, image_size=16, patch_size=8, dim=32, depth=2, heads=2, dim_head=8,
                           mlp_dim=64, out_dim=24)
    style = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    out = agg(style)
    assert out.shape == (2, 24)
    for i in range(3):
        changed = style.clone()
        changed[:, i] = -changed[:, i]
        assert not torch.allclose(agg(changed), out), f"output ignores style image {i}"
    with pytest.raises(ValueError, match="num_images"):
        agg(torch.rand(2, 2, 3, 16, 16))


def test_style_encoder_tiny_backbone_and_local_weights(tmp_path):
    encoder = build_style_encoder(TINY_BACKBONE, out_dim=512)
    out = encoder(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert out.shape == (4, 512)

    path = tmp_path / "encoder.pt"
    torch.save(encoder.state_dict(), path)
    reloaded = build_style_encoder(TINY_BACKBONE, out_dim=512, weights_path=str(path))
    for key, value in encoder.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key

    # a checkpoint with another head size (e.g. ImageNet) loads the backbone, the head stays fresh
    other_head = build_style_encoder(TINY_BACKBONE, out_dim=10)
    torch.save(other_head.state_dict(), path)
    partial = build_style_encoder(TINY_BACKBONE, out_dim=512, weights_path=str(path))
    for key, value in other_head.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(partial.state_dict()[key], value), key
    assert partial.fc.out_features == 512


def test_style_encoder_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path"):
        build_style_encoder(TINY_BACKBONE, weights_path=str(tmp_path / "missing.pt"))
    torch.save({"not_a_layer.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit"):
        build_style_encoder(TINY_BACKBONE, weights_path=str(tmp_path / "wrong.pt"))
    with pytest.raises(ValueError, match="backbone"):
        build_style_encoder("no_such_net")


def test_style_extractor_encodes_all_images_in_one_call():
    encoder = build_style_encoder(TINY_BACKBONE, out_dim=16)
    calls = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    extractor = StyleExtractor(encoder, MeanAggregator())
    style = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    out = extractor(style)
    assert calls == [6]
    encoder.eval()  # batch norm: per-image embeddings must not depend on the batch
    per_image = torch.stack([encoder(style[b]) for b in range(2)])
    torch.testing.assert_close(extractor(style), per_image.mean(dim=1))
    assert out.shape == (2, 16)


def test_style_extractor_with_set_vit_has_no_encoder():
    agg = SetViTAggregator(num_images=2, image_size=16, dim=32, depth=1, heads=2, dim_head=8, out_dim=16)
    extractor = StyleExtractor(None, agg)
    assert extractor(torch.rand(3, 2, 3, 16, 16)).shape == (3, 16)
    with pytest.raises(ValueError, match="encoder must be null"):
        StyleExtractor(None, MeanAggregator())


def test_layout_encoder_downsamples_bilinearly_and_maps_without_bias():
    layout = LayoutEncoder(num_classes=2, out_channels=3)
    assert layout.channel_mapper.bias is None and layout.channel_mapper.kernel_size == (1, 1)
    labels = torch.randint(0, 2, (2, 16, 16))
    onehot = F.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    out = layout(onehot, (4, 4))
    assert out.shape == (2, 3, 4, 4)
    # two bilinear halvings (LDM's SpatialRescaler) = 4 x 4 box average, then the 1 x 1 map
    expected = F.conv2d(F.avg_pool2d(onehot, 4), layout.channel_mapper.weight)
    torch.testing.assert_close(out, expected)
    assert layout(onehot, (16, 16)).shape == (2, 3, 16, 16)  # pixel space: no resampling
    with pytest.raises(ValueError, match="num_classes"):
        layout(torch.zeros(2, 3, 16, 16), (4, 4))
