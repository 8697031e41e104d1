"""The STEDM denoiser: an LDM-style U-Net (diffusers blocks) with a style input in its middle."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn

from stedm.models.ldm_convert import ConvertedStateDict, ldm_unet_to_style_unet
from stedm.models.weights import load_strict, read_state_dict

log = logging.getLogger(__name__)

STYLE_INJECTIONS = ("add", "cross_attention", None)

#: U-Net presets for :func:`build_denoiser`. ``paper`` is the LDM landscape U-Net used by STEDM
#: (234.6 M parameters with the style block); ``tiny`` trains in seconds on CPU at 32-64 px.
DENOISER_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(block_out_channels=(128, 512, 1024), layers_per_block=2, attention_heads=8,
                  time_embedding_dim=512, norm_num_groups=32),
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_heads=2,
                 time_embedding_dim=128, norm_num_groups=8),
}


class StyleCrossAttention(nn.Module):
    """Cross-attention from the U-Net features to a few tokens made from the style vector.

    The style vector is projected to ``num_tokens`` tokens (with one token the softmax would be
    trivial and the block would reduce to a spatially constant bias). Residual, so the block only
    adds style information to the features: forward(B x C x h x w, B x style_dim) -> B x C x h x w.
    """

    def __init__(self, channels: int, style_dim: int, heads: int, num_tokens: int, norm_num_groups: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.to_tokens = nn.Linear(style_dim, num_tokens * style_dim)
        self.attention = Attention(query_dim=channels, cross_attention_dim=style_dim, heads=heads,
                                   dim_head=channels // heads, norm_num_groups=norm_num_groups, bias=True,
                                   cross_attention_norm="layer_norm", residual_connection=True)

    def forward(self, hidden_states: Tensor, style: Tensor) -> Tensor:
        tokens = self.to_tokens(style).unflatten(-1, (self.num_tokens, -1))
        return self.attention(hidden_states, encoder_hidden_states=tokens)


class StyleUNet(nn.Module):
    """LDM U-Net (diffusers ``UNet2DModel`` blocks) whose middle also sees a style vector.

    ``forward(x: B x in_channels x h x w, timesteps: B (long or float) or scalar,
    style: B x style_dim | None) -> B x out_channels x h x w``; h and w must be multiples of
    2 ** (len(block_out_channels) - 1).

    Down and up paths are res blocks only; the middle is res block, self-attention
    (``attention_heads`` heads), res block, as in LDM. ``style_injection`` chooses the style path,
    placed after the first middle res block:

    - ``"add"`` (STEDM): an extra ``ResnetBlock2D`` that receives the style vector where a res
      block receives the timestep embedding (it carries no timestep information);
    - ``"cross_attention"``: :class:`StyleCrossAttention` over ``style_tokens`` tokens;
    - ``None``: no style path and no style parameters (``style`` must be None).

    Cross-attention sits at the same place instead of using ``UNet2DConditionModel``, whose middle
    block would replace LDM's self-attention with a transformer and lose the pretrained weights.
    """

    def __init__(self, in_channels: int = 6, out_channels: int = 3, style_dim: int = 512,
                 style_injection: str | None = "add", block_out_channels: tuple[int, ...] = (128, 512, 1024),
                 layers_per_block: int = 2, attention_heads: int = 8, time_embedding_dim: int = 512,
                 norm_num_groups: int = 32, dropout: float = 0.0, style_tokens: int = 4,
                 gradient_checkpointing: bool = False):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        if style_injection not in STYLE_INJECTIONS:
            raise ValueError(f"style_injection={style_injection!r}; choose 'add', 'cross_attention' or null")
        if any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(f"block_out_channels={block_out_channels} must all be multiples of "
                             f"norm_num_groups={norm_num_groups}")
        middle = block_out_channels[-1]
        if middle % attention_heads:
            raise ValueError(f"attention_heads={attention_heads} must divide the middle width {middle}")
        self.style_injection = style_injection
        self.style_dim = style_dim
        levels = len(block_out_channels)
        # LDM conventions: sinusoidal embedding [cos, sin] without frequency shift, GroupNorm eps 1e-5,
        # time embedding added (not scale-shift), every level but the last downsamples.
        self.unet = UNet2DModel(in_channels=in_channels, out_channels=out_channels,
                                time_embedding_dim=time_embedding_dim, flip_sin_to_cos=True, freq_shift=0,
                                down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
                                block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                                attention_head_dim=middle // attention_heads, norm_num_groups=norm_num_groups,
                                norm_eps=1e-5, dropout=dropout, resnet_time_scale_shift="default")
        if style_injection == "add":
            self.style_block = ResnetBlock2D(in_channels=middle, out_channels=middle, temb_channels=style_dim,
                                             groups=norm_num_groups, eps=1e-5, dropout=dropout)
        elif style_injection == "cross_attention":
            self.style_block = StyleCrossAttention(middle, style_dim, attention_heads, style_tokens, norm_num_groups)
        else:
            self.style_block = None
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    @property
    def size_multiple(self) -> int:
        """Spatial sizes of ``x`` must be multiples of this."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def forward(self, x: Tensor, timesteps: Tensor | float | int, style: Tensor | None = None) -> Tensor:
        self._check_inputs(x, style)
        return self._head(*self._trunk(x, timesteps), style)

    def forward_guided(self, x: Tensor, timesteps: Tensor | float | int, style: Tensor,
                       null_style: Tensor) -> tuple[Tensor, Tensor]:
        """``(forward(x, t, style), forward(x, t, null_style))`` with the shared work done once.

        Everything before the style block (input conv, down path, first middle res block) sees
        only ``x`` and ``t``, so classifier-free guidance on the style can compute it once and
        run only the rest (style block, middle, up path) on both halves: the same result as two
        forward passes, for the cost of about 1.6 (paper preset).
        """
        if self.style_block is None:
            raise ValueError("forward_guided() needs a style path; this StyleUNet has style_injection=null")
        self._check_inputs(x, style)
        self._check_inputs(x, null_style)
        h, skips, emb = self._trunk(x, timesteps)
        both = self._head(torch.cat([h, h]), tuple(torch.cat([s, s]) for s in skips), torch.cat([emb, emb]),
                          torch.cat([style, null_style]))
        return both.chunk(2)

    def _trunk(self, x: Tensor, timesteps: Tensor | float | int) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        """The layers before the style block: (features, skip connections, time embedding)."""
        unet = self.unet
        emb = self._embed_timesteps(timesteps, x)
        h = unet.conv_in(x)
        skips: tuple[Tensor, ...] = (h,)
        for block in unet.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += res
        return unet.mid_block.resnets[0](h, emb), skips, emb

    def _head(self, h: Tensor, skips: tuple[Tensor, ...], emb: Tensor, style: Tensor | None) -> Tensor:
        """The style block and everything after it."""
        unet = self.unet
        mid = unet.mid_block
        if self.style_block is not None:
            h = self.style_block(h, style.to(h.dtype))
        for attention, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
            h = resnet(attention(h), emb)
        for block in unet.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], emb)
            skips = skips[:-n]
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))

    def _embed_timesteps(self, timesteps: Tensor | float | int, x: Tensor) -> Tensor:
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        # the sinusoidal projection is computed in float32; the MLP runs in the weights' dtype
        t_emb = self.unet.time_proj(t).to(self.unet.time_embedding.linear_1.weight.dtype)
        return self.unet.time_embedding(t_emb)

    def _check_inputs(self, x: Tensor, style: Tensor | None) -> None:
        if x.ndim != 4 or x.shape[-1] % self.size_multiple or x.shape[-2] % self.size_multiple:
            raise ValueError(f"StyleUNet expects x shaped B x C x h x w with h, w multiples of {self.size_multiple}, "
                             f"got {tuple(x.shape)}")
        if self.style_block is None and style is not None:
            raise ValueError("this StyleUNet has no style path (style_injection=null); pass style=None")
        if self.style_block is not None:
            if style is None:
                raise ValueError(f"style_injection={self.style_injection!r} needs a style vector B x {self.style_dim}")
            if style.shape != (x.shape[0], self.style_dim):
                raise ValueError(f"style must be B x {self.style_dim} = {(x.shape[0], self.style_dim)}, "
                                 f"got {tuple(style.shape)}")

    def load_ldm_weights(self, state_dict: dict[str, Tensor]) -> ConvertedStateDict:
        """Load an original LDM denoiser (e.g. the landscape checkpoint) into ``self.unet``.

        The style block has no LDM counterpart and keeps its initialisation; every U-Net parameter
        must be present with the right shape. Returns the conversion (its ``skipped`` keys:
        autoencoder, EMA copy, the landscape's layout encoder, ...).
        """
        cfg = self.unet.config
        converted = ldm_unet_to_style_unet(state_dict, num_levels=len(cfg.block_out_channels),
                                           layers_per_block=cfg.layers_per_block,
                                           attention_heads=cfg.block_out_channels[-1] // cfg.attention_head_dim)
        load_strict(self, converted.state_dict, "the LDM denoiser checkpoint", allowed_missing=("style_block.",))
        log.info("loaded LDM denoiser weights; style block left at random init; skipped %d keys: %s",
                 len(converted.skipped), ", ".join(converted.skipped[:10]))
        return converted


def build_denoiser(preset: str = "tiny", in_channels: int = 6, out_channels: int = 3, style_dim: int = 512,
                   style_injection: str | None = "add", weights_path: str | None = None, **overrides: Any) -> StyleUNet:
    """A :class:`StyleUNet` from a preset of :data:`DENOISER_PRESETS`, any constructor argument
    overridden by keyword. ``weights_path``: a local original-LDM checkpoint (e.g. the landscape
    ``.ckpt``) to initialise the U-Net from, as STEDM does with the ``paper`` preset."""
    if preset not in DENOISER_PRESETS:
        raise ValueError(f"preset={preset!r}; choose one of {sorted(DENOISER_PRESETS)}")
    model = StyleUNet(in_channels=in_channels, out_channels=out_channels, style_dim=style_dim,
                      style_injection=style_injection, **{**DENOISER_PRESETS[preset], **overrides})
    if weights_path is not None:
        model.load_ldm_weights(read_state_dict(weights_path, "weights_path"))
    return model
