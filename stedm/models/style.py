"""Style path of STEDM: a style encoder embeds each style image, an aggregator turns the set of
embeddings into one style vector that conditions the denoiser.

Hydra configs build the pieces with plain constructor arguments, e.g.::

    _target_: stedm.models.style.StyleExtractor
    encoder: {_target_: stedm.models.style.build_style_encoder, backbone: swin_v2_t}
    aggregator: {_target_: stedm.models.style.MeanAggregator}

``SetViTAggregator`` replaces the encoder (``encoder: null``).
"""

from __future__ import annotations

import logging
import math

import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import PatchEmbed
from torch import Tensor, nn

from stedm.models.weights import load_strict, read_state_dict

log = logging.getLogger(__name__)

#: Pixel value of the "null style" image (outside the data range [-1, 1]). Style dropout and the
#: unconditional branch of classifier-free guidance feed it through the style encoder.
NULL_STYLE_VALUE = -2.0


def null_style_like(style: Tensor) -> Tensor:
    """The null style: a tensor shaped like ``style`` with every value ``NULL_STYLE_VALUE``."""
    return torch.full_like(style, NULL_STYLE_VALUE)


def build_style_encoder(backbone: str = "swin_v2_t", out_dim: int = 512, weights_path: str | None = None) -> nn.Module:
    """A classification backbone whose head is a fresh ``Linear(features, out_dim)``.

    ``backbone`` is a torchvision model name (paper: ``swin_v2_t``, head 768 -> 512) or a timm name
    prefixed with ``timm:`` (``timm:test_resnet`` is a tiny one for CPU tests). The network is
    randomly initialised; ``weights_path`` loads a local state dict of the same backbone (a head of
    another size, e.g. ImageNet's 1000 classes, is skipped and stays random). Input: B x 3 x H x W
    in [-1, 1] without ImageNet normalisation; output: B x out_dim.
    """
    try:
        if backbone.startswith("timm:"):
            model = timm.create_model(backbone.removeprefix("timm:"), pretrained=False, num_classes=out_dim)
        else:
            model = torchvision.models.get_model(backbone, weights=None, num_classes=out_dim)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"backbone={backbone!r} is neither a torchvision model name nor 'timm:<timm model name>' "
                         f"({err})") from err
    if weights_path is not None:
        _load_backbone_weights(model, weights_path)
    return model


def _load_backbone_weights(model: nn.Module, weights_path: str) -> None:
    state = read_state_dict(weights_path, "weights_path")
    # torchvision and timm both register the classification head as the model's last Linear.
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1] + "."
    own = model.state_dict()
    other_head = [k for k in state if k.startswith(head) and k in own and state[k].shape != own[k].shape]
    if other_head:
        log.warning("weights_path=%s: head %s has another output size; it keeps its random initialisation",
                    weights_path, head.rstrip("."))
    load_strict(model, {k: v for k, v in state.items() if k not in other_head}, f"weights_path={weights_path!r}",
                allowed_missing=(head,) if other_head else ())


def _check_embeddings(emb: Tensor, name: str) -> None:
    if emb.ndim != 3:
        raise ValueError(f"{name} expects embeddings shaped B x n x D, got {tuple(emb.shape)}")


class MeanAggregator(nn.Module):
    """Element-wise mean over the set of style embeddings: B x n x D -> B x D."""

    def forward(self, emb: Tensor) -> Tensor:
        _check_embeddings(emb, type(self).__name__)
        return emb.mean(dim=1)


class MaxAggregator(nn.Module):
    """Element-wise maximum over the set of style embeddings: B x n x D -> B x D."""

    def forward(self, emb: Tensor) -> Tensor:
        _check_embeddings(emb, type(self).__name__)
        return emb.amax(dim=1)


class LinearAggregator(nn.Module):
    """Concatenate the n embeddings and mix them with an MLP: B x n x dim -> B x dim.

    ReLU, Linear(n * dim, dim), ReLU, Linear(dim, dim), ReLU (as in STEDM; the leading ReLU acts on
    the encoder's linear head output).
    """

    def __init__(self, num_images: int, dim: int = 512):
        super().__init__()
        self.num_images = num_images
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(num_images * dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, emb: Tensor) -> Tensor:
        _check_embeddings(emb, type(self).__name__)
        if emb.shape[1] != self.num_images:
            raise ValueError(f"LinearAggregator was built for num_images={self.num_images} style images, "
                             f"got {emb.shape[1]}; set num_images to the style source's number of images")
        return self.mlp(emb.flatten(1))


class LocalitySelfAttention(nn.Module):
    """Multi-head self-attention with a learnable softmax temperature and the diagonal masked, so a
    token attends to every token but itself (Lee et al. 2021, "Vision Transformer for Small-Size
    Datasets"): B x N x dim -> B x N x dim."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        # Starts at the usual 1/sqrt(d) scaling; stored as a log to keep it positive.
        self.log_temperature = nn.Parameter(torch.tensor(math.log(dim_head**-0.5)))

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        not_self = ~torch.eye(n, dtype=torch.bool, device=x.device)
        out = F.scaled_dot_product_attention(q * self.log_temperature.exp(), k, v, attn_mask=not_self, scale=1.0)
        return self.to_out(out.transpose(1, 2).flatten(2))


class _SetViTBlock(nn.Module):
    """Pre-norm transformer block: locality self-attention, then a GELU MLP, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = LocalitySelfAttention(dim, heads, dim_head)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class SetViTAggregator(nn.Module):
    """A small ViT over the whole set of style images at once; replaces the style encoder.

    The n images are stacked on channels (3n), cut into ``patch_size`` patches, passed through
    ``depth`` locality-self-attention blocks, mean-pooled over tokens, layer-normed and projected
    to ``out_dim``. Input: B x n x 3 x image_size x image_size in [-1, 1]; output: B x out_dim.
    """

    def __init__(self, num_images: int, image_size: int, patch_size: int = 8, dim: int = 256, depth: int = 6,
                 heads: int = 12, dim_head: int = 64, mlp_dim: int = 512, out_dim: int = 512):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"SetViTAggregator: image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.num_images, self.image_size = num_images, image_size
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans=3 * num_images, embed_dim=dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(_SetViTBlock(dim, heads, dim_head, mlp_dim) for _ in range(depth)))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim))

    def forward(self, style: Tensor) -> Tensor:
        expected = (self.num_images, 3, self.image_size, self.image_size)
        if style.ndim != 5 or tuple(style.shape[1:]) != expected:
            raise ValueError(f"SetViTAggregator expects style images shaped B x {' x '.join(map(str, expected))}, "
                             f"got {tuple(style.shape)}; set num_images / image_size to the style source's")
        tokens = self.blocks(self.patch_embed(style.flatten(1, 2)) + self.pos_embed)
        return self.head(tokens.mean(dim=1))


class StyleExtractor(nn.Module):
    """Style images -> one style vector: ``forward(style: B x n x 3 x H x W) -> B x D``.

    All B * n images go through ``encoder`` in one batched call, then ``aggregator`` reduces the n
    embeddings per sample. ``encoder=None`` only with ``SetViTAggregator``, which sees the images.
    """

    def __init__(self, encoder: nn.Module | None, aggregator: nn.Module):
        super().__init__()
        if (encoder is None) != isinstance(aggregator, SetViTAggregator):
            raise ValueError("StyleExtractor: encoder must be null exactly when the aggregator is SetViTAggregator "
                             f"(got encoder={type(encoder).__name__}, aggregator={type(aggregator).__name__})")
        self.encoder = encoder
        self.aggregator = aggregator

    def forward(self, style: Tensor) -> Tensor:
        if style.ndim != 5 or style.shape[2] != 3:
            raise ValueError(f"StyleExtractor expects style images shaped B x n x 3 x H x W, got {tuple(style.shape)}")
        if self.encoder is None:
            return self.aggregator(style)
        b, n = style.shape[:2]
        emb = self.encoder(style.flatten(0, 1))
        return self.aggregator(emb.view(b, n, -1))
