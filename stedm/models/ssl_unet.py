"""The GenSelfDiff-HIS U-Net (docs/method.md, 2 GenSelfDiff-HIS): a diffusion denoiser that is later fine-tuned as a segmenter.

Architecture of the original "DiffusionNet(dim=64)" (31.27 M parameters with the default preset):

- stem: 7x7 conv to ``init_dim = dim // 3 * 2`` (42) channels;
- time: sinusoidal embedding of width ``dim`` -> MLP (Linear, GELU, Linear) to ``4 * dim``;
- encoder: one level per entry of ``dim_mults`` (channels 64, 128, 256, 512 at 256 -> 32 px),
  each two :class:`ResBlock` s, a residual :class:`LinearAttention` and a stride-2 4x4 conv
  down-sample (the last level keeps its resolution);
- middle: res block, full (softmax) attention, res block;
- decoder: one up stage per level except the first; each concatenates the skip of its level,
  runs two res blocks and linear attention, and up-samples with a stride-2 transposed conv.
  The skip of the first (full-resolution) level is never used, as in the original;
- head (:class:`OutputHead`): a res block without time input + 1x1 conv. Fine-tuning replaces
  exactly this part (:meth:`SSLUNet.replace_head`).

The full attention and the time embedding are diffusers blocks; the res block (conv -> norm ->
act order, time added between the two halves) and the linear attention have no diffusers
equivalent and are written here. The file written by pretraining (the constructor arguments
that rebuild the denoiser, and two weight sets: its EMA and its live weights) is read and
written only by :func:`save_pretrained_unet` / :func:`load_pretrained_unet`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
)
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from stedm.fileio import atomic_path

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's network.
    "default": {"dim": 64, "dim_mults": (1, 2, 4, 8)},
    # For tests and CPU demos: 3 levels (inputs divisible by 4), narrow attention.
    "tiny": {"dim": 16, "dim_mults": (1, 2, 4), "attn_heads": 2, "attn_head_dim": 8},
}

PRETRAINED_FORMAT = "stedm.ssl_unet/2"  # config + {"ema": ..., "live": ...}
LEGACY_FORMAT = "stedm.ssl_unet/1"  # config + one state_dict (the EMA)


#: How the full attention computes: ``sdpa`` (torch's fused ``scaled_dot_product_attention``,
#: diffusers' default) or ``explicit`` (the ``N x N`` softmax materialised, as the original does).
ATTENTION_PROCESSORS = {"sdpa": AttnProcessor2_0, "explicit": AttnProcessor}


class ResBlock(nn.Module):
    """Two ``conv3x3 -> GroupNorm -> SiLU`` halves; the time embedding is added between them.

    ``time_embed_dim=None`` gives a block without time input (the head's block).
    """

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int | None = None, groups: int = 8) -> None:
        super().__init__()
        self.time_proj = (
            nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, out_channels)) if time_embed_dim is not None else None
        )
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.act = nn.SiLU()
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        if self.time_proj is not None:
            if temb is None:
                raise ValueError("this ResBlock takes a time embedding")
            h = h + self.time_proj(temb)[:, :, None, None]
        h = self.act(self.norm2(self.conv2(h)))
        return h + self.shortcut(x)


class LinearAttention(nn.Module):
    """Residual, pre-normed "efficient attention" (Shen et al., 2021), linear in the pixel count.

    Queries are softmax-normalised over their feature dimension, keys over the pixels, so the
    ``d x d`` context ``K V^T`` replaces the ``N x N`` attention matrix.
    """

    def __init__(self, channels: int, heads: int = 4, head_dim: int = 32) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.scale = head_dim**-0.5
        hidden = heads * head_dim
        self.norm = nn.GroupNorm(1, channels)
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, channels, 1), nn.GroupNorm(1, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, 3, self.heads, self.head_dim, h * w).unbind(1)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, self.heads * self.head_dim, h, w)
        return x + self.to_out(out)


def full_attention(channels: int, heads: int, head_dim: int) -> Attention:
    """Residual, pre-normed (GroupNorm(1)) multi-head softmax attention over all pixels."""
    return Attention(
        query_dim=channels, heads=heads, dim_head=head_dim, norm_num_groups=1,
        bias=False, out_bias=True, residual_connection=True,
    )


class DownLevel(nn.Module):
    """Encoder level: two res blocks, linear attention; returns (skip, down-sampled output)."""

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int, groups: int,
                 heads: int, head_dim: int, downsample: bool) -> None:
        super().__init__()
        self.res1 = ResBlock(in_channels, out_channels, time_embed_dim, groups)
        self.res2 = ResBlock(out_channels, out_channels, time_embed_dim, groups)
        self.attn = LinearAttention(out_channels, heads, head_dim)
        self.downsample = nn.Conv2d(out_channels, out_channels, 4, stride=2, padding=1) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.attn(self.res2(self.res1(x, temb), temb))
        return skip, self.downsample(skip)


class UpLevel(nn.Module):
    """Decoder stage: concatenate the level's skip, two res blocks, linear attention, up-sample."""

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int, groups: int,
                 heads: int, head_dim: int) -> None:
        super().__init__()
        self.res1 = ResBlock(2 * in_channels, out_channels, time_embed_dim, groups)
        self.res2 = ResBlock(out_channels, out_channels, time_embed_dim, groups)
        self.attn = LinearAttention(out_channels, heads, head_dim)
        self.upsample = nn.ConvTranspose2d(out_channels, out_channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.res1(torch.cat((x, skip), dim=1), temb)
        return self.upsample(self.attn(self.res2(x, temb)))


class OutputHead(nn.Module):
    """The part replaced at fine-tuning: a res block without time input + 1x1 conv."""

    def __init__(self, channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.res = ResBlock(channels, channels, None, groups)
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.res(x))


class SSLUNet(nn.Module):
    """Denoising U-Net of GenSelfDiff-HIS; ``forward(x, timesteps) -> out`` of shape ``B x out_channels x H x W``.

    ``x`` is ``B x in_channels x H x W`` with ``H, W`` divisible by ``2 ** (len(dim_mults) - 1)``;
    ``timesteps`` a scalar or a length-``B`` tensor of (integer or float) diffusion steps.
    ``config`` holds the constructor arguments (JSON-friendly) that rebuild the network.
    """

    def __init__(
        self,
        dim: int = 64,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        in_channels: int = 3,
        out_channels: int = 3,
        init_dim: int | None = None,
        norm_groups: int = 8,
        attn_heads: int = 4,
        attn_head_dim: int = 32,
    ) -> None:
        super().__init__()
        dim_mults = tuple(int(m) for m in dim_mults)
        if len(dim_mults) < 2:
            raise ValueError(f"dim_mults needs at least 2 levels, got {dim_mults}")
        init_dim = dim // 3 * 2 if init_dim is None else init_dim
        self.config: dict[str, Any] = {
            "dim": dim, "dim_mults": list(dim_mults), "in_channels": in_channels, "out_channels": out_channels,
            "init_dim": init_dim, "norm_groups": norm_groups, "attn_heads": attn_heads, "attn_head_dim": attn_head_dim,
        }
        channels = [init_dim, *(dim * m for m in dim_mults)]
        bad = [c for c in channels[1:] if c % norm_groups]
        if bad:
            raise ValueError(f"level channels {channels[1:]} must be divisible by norm_groups={norm_groups}")
        time_embed_dim = 4 * dim
        attn = {"heads": attn_heads, "head_dim": attn_head_dim}

        self.stem = nn.Conv2d(in_channels, init_dim, 7, padding=3)
        # downscale_freq_shift=1, sin before cos: the original's sinusoidal embedding.
        self.time_proj = Timesteps(dim, flip_sin_to_cos=False, downscale_freq_shift=1)
        self.time_embedding = TimestepEmbedding(dim, time_embed_dim, act_fn="gelu")
        levels = len(dim_mults)
        self.down_levels = nn.ModuleList(
            DownLevel(channels[i], channels[i + 1], time_embed_dim, norm_groups, downsample=i < levels - 1, **attn)
            for i in range(levels)
        )
        mid = channels[-1]
        self.mid_res1 = ResBlock(mid, mid, time_embed_dim, norm_groups)
        self.mid_attn = full_attention(mid, attn_heads, attn_head_dim)
        self.mid_res2 = ResBlock(mid, mid, time_embed_dim, norm_groups)
        # Up stage for level l (deepest first) maps channels[l] (+ its skip) to channels[l - 1].
        self.up_levels = nn.ModuleList(
            UpLevel(channels[i], channels[i - 1], time_embed_dim, norm_groups, **attn) for i in range(levels, 1, -1)
        )
        self.head = OutputHead(channels[1], out_channels, norm_groups)

    @property
    def downsampling_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.down_levels) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float) -> torch.Tensor:
        factor = self.downsampling_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by {factor} for this SSLUNet")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        temb = self.time_embedding(self.time_proj(timesteps).to(self.stem.weight.dtype))

        x = self.stem(x)
        skips = []
        for level in self.down_levels:
            skip, x = level(x, temb)
            skips.append(skip)
        x = self.mid_res2(self.mid_attn(self.mid_res1(x, temb)), temb)
        for up, skip in zip(self.up_levels, reversed(skips[1:]), strict=True):  # skips[0] (full resolution) is unused
            x = up(x, skip, temb)
        return self.head(x)

    def head_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the part that :meth:`replace_head` re-creates."""
        return ("head.",)

    def replace_head(self, num_classes: int) -> None:
        """Re-create the head (final res block + 1x1 conv) with ``num_classes`` outputs, freshly initialised."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        old = self.head.out
        self.head = OutputHead(old.in_channels, num_classes, self.config["norm_groups"]).to(
            device=old.weight.device, dtype=old.weight.dtype)
        self.config["out_channels"] = num_classes

    def load_backbone(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Load every weight but the head from ``state_dict``; return the (head) keys left as they were.

        Raises ``ValueError`` if anything outside the head is missing or unexpected.
        """
        prefixes = self.head_prefixes()
        backbone = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
        missing, unexpected = self.load_state_dict(backbone, strict=False)
        bad_missing = [k for k in missing if not k.startswith(prefixes)]
        if bad_missing or unexpected:
            raise ValueError(
                f"pretrained weights do not fit this SSLUNet: missing {bad_missing[:5]}"
                f"{'...' if len(bad_missing) > 5 else ''} ({len(bad_missing)} in all), unexpected "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
        return list(missing)


def set_attention(net: nn.Module, kind: str) -> None:
    """Make every full (diffusers) attention in ``net`` compute the ``kind`` way (:data:`ATTENTION_PROCESSORS`)."""
    if kind not in ATTENTION_PROCESSORS:
        raise ValueError(f"attention must be one of {sorted(ATTENTION_PROCESSORS)}, got '{kind}'")
    for module in net.modules():
        if isinstance(module, Attention):
            module.set_processor(ATTENTION_PROCESSORS[kind]())


def build_ssl_unet(preset: str = "default", **overrides: Any) -> SSLUNet:
    """An :class:`SSLUNet` from a named preset (``default`` = the paper, ``tiny``) plus overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown SSLUNet preset '{preset}'; choose one of {sorted(PRESETS)}")
    return SSLUNet(**{**PRESETS[preset], **overrides})


#: The weight sets a pretraining export holds: the EMA of the weights (what the original fine-tuned)
#: and the live (last optimizer step) weights; ``pretrained_weights`` chooses one at fine-tuning.
WEIGHT_SETS = ("ema", "live")
EXPECTED_FILE = ("the pretrained_unet.pt that pretrain_ssl.py writes into its run directory "
                 "(<location.result_dir>/runs/pretrain_ssl/<run_name>/pretrained_unet.pt, or "
                 "pretrained_unet.safetensors with its card beside it)")


def save_pretrained_unet(path: str | Path, config: dict[str, Any], ema: dict[str, torch.Tensor],
                         live: dict[str, torch.Tensor] | None = None) -> None:
    """Write the pretrained denoiser atomically to ``path``: constructor ``config`` and its weight
    sets, the ``ema`` weights and (if given) the ``live`` ones. ``.safetensors``: the tensors as
    ``ema.<name>`` / ``live.<name>`` with a model card beside it (:mod:`stedm.models.cards`: the
    config under ``model.ssl_unet``, the sets under ``weight_sets``); any other suffix: a
    ``torch.save`` file of format :data:`PRETRAINED_FORMAT`."""
    path = Path(path)
    sets = {"ema": ema} if live is None else {"ema": ema, "live": live}
    weights = {name: {k: v.detach().to("cpu", copy=True) for k, v in state.items()} for name, state in sets.items()}
    if path.suffix == ".safetensors":
        from stedm.models.cards import write_weights

        tensors = {f"{name}.{k}": v for name, state in weights.items() for k, v in state.items()}
        write_weights(path, tensors, {"task": "pretrain_ssl", "model": {"ssl_unet": dict(config)},
                                      "weight_sets": list(weights)}, overwrite=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": PRETRAINED_FORMAT, "config": dict(config), "weights": weights}, tmp)


def _read_safetensors_export(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` export: its card must describe an SSL U-Net; the weights must match the card."""
    from stedm.models.cards import card_path, read_card
    from stedm.models.weights import read_state_dict

    if not path.is_file():
        raise FileNotFoundError(f"pretrained={path}: no such file; expected {EXPECTED_FILE}")
    card = read_card(path)
    config = ((card or {}).get("model") or {}).get("ssl_unet")
    if config is None:
        raise ValueError(f"pretrained={path} has no model card describing an SSL U-Net ({card_path(path).name}: "
                         f"{'missing' if card is None else 'task ' + repr(card.get('task'))}); expected {EXPECTED_FILE}")
    tensors = read_state_dict(path, "pretrained")
    weights = {name: {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
               for name in card.get("weight_sets") or ["ema"]}
    return {"config": config, "weights": weights}


def _read_export(path: Path) -> dict[str, Any]:
    """The file's payload, or an error that names the ``pretrained`` key, the file and what it should be."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained={path}: no such file; expected {EXPECTED_FILE}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # text, a truncated file, a training checkpoint holding more than tensors, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"pretrained={path} is not a pretrained SSL U-Net file (torch.load: {reason[:200]}); "
                         f"expected {EXPECTED_FILE}") from error
    if not isinstance(payload, dict) or payload.get("format") not in (PRETRAINED_FORMAT, LEGACY_FORMAT):
        what = "a Lightning training checkpoint" if isinstance(payload, dict) and "pytorch-lightning_version" in payload \
            else "not a pretrained SSL U-Net file"
        raise ValueError(f"pretrained={path} is {what} (no format '{PRETRAINED_FORMAT}'); expected {EXPECTED_FILE}")
    return payload


def load_pretrained_unet(path: str | Path, weights: str = "ema") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a file written by :func:`save_pretrained_unet`: ``(config, state_dict)`` of the
    ``weights`` set (``ema`` or ``live``). A file holding one set only (exports before the live
    weights were added hold the EMA) gives its EMA weights, with a log line; ``live`` is refused there."""
    if weights not in WEIGHT_SETS:
        raise ValueError(f"pretrained_weights={weights} is unknown; choose one of {', '.join(WEIGHT_SETS)}")
    path = Path(path)
    payload = _read_safetensors_export(path) if path.suffix == ".safetensors" else _read_export(path)
    sets = payload["weights"] if "weights" in payload else {"ema": payload["state_dict"]}
    if weights not in sets:
        raise ValueError(f"pretrained={path} holds only the {', '.join(sets)} weights (an export written before "
                         f"pretraining saved both); use pretrained_weights=ema, or export again from the "
                         f"pretraining run's last.ckpt")
    if len(sets) == 1:
        log.info("pretrained=%s holds one weight set (%s, an older export); using it", path, weights)
    return payload["config"], sets[weights]


class SSLSegmentationNet(nn.Module):
    """An :class:`SSLUNet` used as a segmenter: one deterministic pass at constant ``t = 0``.

    ``forward(image)`` takes ``B x 3 x H x W`` in ``[-1, 1]`` (the range of pretraining and of the
    data contract) and returns logits ``B x num_classes x H x W``.
    """

    def __init__(self, unet: SSLUNet) -> None:
        super().__init__()
        self.unet = unet

    @property
    def num_classes(self) -> int:
        return self.unet.config["out_channels"]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        return self.unet(image, t)


def build_ssl_segmenter(
    num_classes: int,
    preset: str = "default",
    pretrained_path: str | Path | None = None,
    from_scratch: bool = False,
    pretrained_weights: str = "ema",
    **overrides: Any,
) -> SSLSegmentationNet:
    """The fine-tuning network: pretrained backbone (every weight but the head) + new head.

    Give either ``pretrained_path`` (a ``pretrained_unet.pt`` written by the SSL pretrainer; its
    architecture must equal ``preset`` + ``overrides``) or ``from_scratch=True`` (the random-init
    baseline, otherwise identical). ``pretrained_weights`` picks the file's ``ema`` (default) or
    ``live`` weights. Errors name the CLI keys of finetune_ssl.py (``pretrained``, ``from_scratch``,
    ``pretrained_weights``).
    """
    if (pretrained_path is None) == (not from_scratch):
        raise ValueError("finetune_ssl: give pretrained=RUN_DIR/pretrained_unet.pt (SSL-pretrained) or "
                         "from_scratch=true (random-init baseline), not both and not neither")
    if pretrained_weights not in WEIGHT_SETS:
        raise ValueError(f"pretrained_weights={pretrained_weights} is unknown; choose one of {', '.join(WEIGHT_SETS)}")
    unet = build_ssl_unet(preset, **overrides)
    unet.replace_head(num_classes)
    if pretrained_path is not None:
        config, state_dict = load_pretrained_unet(pretrained_path, pretrained_weights)
        differ = {k: (config.get(k), v) for k, v in unet.config.items() if k != "out_channels" and config.get(k) != v}
        if differ:
            raise ValueError(
                f"pretrained={pretrained_path} was pretrained with a different architecture; (file, requested) for "
                f"{differ}: choose the ssl_net/preset it was pretrained with")
        reinitialised = unet.load_backbone(state_dict)
        log.info("loaded the %s weights of the SSL-pretrained U-Net %s; re-initialised head (%d tensors): %s",
                 pretrained_weights, pretrained_path, len(reinitialised), reinitialised)
    return SSLSegmentationNet(unet)
