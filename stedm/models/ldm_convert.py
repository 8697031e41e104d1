"""Converters between the original latent-diffusion (LDM) checkpoints and our diffusers-based modules.

The LDM release stores Lightning ``.ckpt`` files. Two parts of them are used here:

- the vq-f4 autoencoder (``encoder.*``, ``decoder.*``, ``quant_conv``, ``quantize.embedding``,
  ``post_quant_conv``; ``first_stage_model.`` prefix inside full checkpoints) -> diffusers
  ``VQModel`` (the same mapping serves LDM's KL autoencoders -> ``AutoencoderKL``);
- the "landscape" semantic-synthesis denoiser (``model.diffusion_model.*``) -> ``StyleUNet``
  (its ``unet.*`` part; STEDM's style block has no weights there and starts from random).

Every mapping is generated from the architecture (number of levels, res blocks per level), so
each direction is one table walk and the inverse is exact (round trip reproduces every tensor).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from stedm.models.weights import read_state_dict

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_FIRST_STAGE_PREFIX = "first_stage_model."

Params = dict[str, Tensor]


@dataclass
class ConvertedStateDict:
    """Result of a conversion: the target state dict and the source keys that have no counterpart."""

    state_dict: Params
    skipped: list[str] = field(default_factory=list)


def load_ldm_checkpoint(path: str | Path) -> Params:
    """The ``state_dict`` of a local LDM Lightning checkpoint (or a bare state dict file)."""
    return read_state_dict(path, "weights_path")


# --- per-module parameter converters --------------------------------------------------------------
# Each converter maps the parameters of ONE module (names relative to the module) in both directions.


@dataclass(frozen=True)
class _Renamed:
    """Sub-module renames only (``""`` is the module itself: its own ``weight``/``bias``)."""

    ldm_to_ours: dict[str, str]

    def _rename(self, params: Params, table: dict[str, str]) -> Params:
        out = {}
        for name, tensor in params.items():
            sub, _, leaf = name.rpartition(".")
            if sub not in table:
                raise KeyError(f"unexpected parameter {name!r} (known sub-modules: {sorted(table)})")
            out[f"{table[sub]}.{leaf}" if table[sub] else leaf] = tensor
        return out

    def to_ours(self, params: Params) -> Params:
        return self._rename(params, self.ldm_to_ours)

    def to_ldm(self, params: Params) -> Params:
        return self._rename(params, {v: k for k, v in self.ldm_to_ours.items()})


_PLAIN = _Renamed({"": ""})
# LDM openaimodel ResBlock -> diffusers ResnetBlock2D (time embedding added after conv1 in both).
_UNET_RESBLOCK = _Renamed({"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"})
# LDM autoencoder ResnetBlock -> diffusers ResnetBlock2D without time embedding.
_VAE_RESBLOCK = _Renamed({"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                          "nin_shortcut": "conv_shortcut"})


class _VaeAttention:
    """LDM ``AttnBlock`` (GroupNorm + 1x1-conv q, k, v, proj_out) <-> diffusers ``Attention`` (Linear)."""

    _names: ClassVar[dict[str, str]] = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                                         "proj_out": "to_out.0"}

    def to_ours(self, params: Params) -> Params:
        out = {}
        for name, t in params.items():
            sub, _, leaf = name.rpartition(".")
            out[f"{self._names[sub]}.{leaf}"] = t[:, :, 0, 0] if sub != "norm" and leaf == "weight" else t
        return out

    def to_ldm(self, params: Params) -> Params:
        back = {v: k for k, v in self._names.items()}
        out = {}
        for name, t in params.items():
            sub, _, leaf = name.rpartition(".")
            out[f"{back[sub]}.{leaf}"] = t[:, :, None, None] if sub != "group_norm" and leaf == "weight" else t
        return out


@dataclass(frozen=True)
class _UnetAttention:
    """LDM ``AttentionBlock`` (GroupNorm, fused 1-d-conv ``qkv``, ``proj_out``) <-> diffusers ``Attention``.

    LDM's default (legacy) attention order lays the fused channels out per head as [q, k, v]:
    ``qkv.reshape(heads, 3, head_dim, ...)``.
    """

    heads: int

    def to_ours(self, params: Params) -> Params:
        out = {"group_norm.weight": params["norm.weight"], "group_norm.bias": params["norm.bias"],
               "to_out.0.weight": params["proj_out.weight"][..., 0], "to_out.0.bias": params["proj_out.bias"]}
        for leaf in ("weight", "bias"):
            qkv = params[f"qkv.{leaf}"]
            if leaf == "weight":
                qkv = qkv[..., 0]
            per_head = qkv.reshape(self.heads, 3, -1, *qkv.shape[1:])
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{name}.{leaf}"] = per_head[:, i].reshape(-1, *qkv.shape[1:])
        return out

    def to_ldm(self, params: Params) -> Params:
        out = {"norm.weight": params["group_norm.weight"], "norm.bias": params["group_norm.bias"],
               "proj_out.weight": params["to_out.0.weight"][..., None], "proj_out.bias": params["to_out.0.bias"]}
        for leaf in ("weight", "bias"):
            q, k, v = (params[f"{name}.{leaf}"] for name in ("to_q", "to_k", "to_v"))
            per_head = torch.stack([t.reshape(self.heads, -1, *t.shape[1:]) for t in (q, k, v)], dim=1)
            qkv = per_head.reshape(-1, *q.shape[1:])
            out[f"qkv.{leaf}"] = qkv[..., None] if leaf == "weight" else qkv
        return out


_Converter = _Renamed | _VaeAttention | _UnetAttention
# module table: LDM module path -> (our module path, converter)
_ModuleTable = dict[str, tuple[str, _Converter]]


# --- module tables -------------------------------------------------------------------------------


def _autoencoder_table(num_levels: int, layers_per_block: int) -> _ModuleTable:
    table: _ModuleTable = {}
    for coder in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            table[f"{coder}.{name}"] = (f"{coder}.{name}", _PLAIN)
        table[f"{coder}.norm_out"] = (f"{coder}.conv_norm_out", _PLAIN)
        table[f"{coder}.mid.block_1"] = (f"{coder}.mid_block.resnets.0", _VAE_RESBLOCK)
        table[f"{coder}.mid.attn_1"] = (f"{coder}.mid_block.attentions.0", _VaeAttention())
        table[f"{coder}.mid.block_2"] = (f"{coder}.mid_block.resnets.1", _VAE_RESBLOCK)
    for level in range(num_levels):
        for j in range(layers_per_block):
            table[f"encoder.down.{level}.block.{j}"] = (f"encoder.down_blocks.{level}.resnets.{j}", _VAE_RESBLOCK)
        if level < num_levels - 1:
            downsample = f"encoder.down_blocks.{level}.downsamplers.0.conv"
            table[f"encoder.down.{level}.downsample.conv"] = (downsample, _PLAIN)
        # LDM numbers decoder levels by resolution (0 = full size), diffusers in execution order.
        up = num_levels - 1 - level
        for j in range(layers_per_block + 1):
            table[f"decoder.up.{level}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RESBLOCK)
        if level > 0:
            table[f"decoder.up.{level}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", _PLAIN)
    for name in ("quant_conv", "post_quant_conv", "quantize.embedding"):
        table[name] = (name, _PLAIN)
    return table


def _unet_table(num_levels: int, layers_per_block: int, attention_heads: int) -> _ModuleTable:
    table: _ModuleTable = {
        "time_embed.0": ("unet.time_embedding.linear_1", _PLAIN),
        "time_embed.2": ("unet.time_embedding.linear_2", _PLAIN),
        "input_blocks.0.0": ("unet.conv_in", _PLAIN),
        "middle_block.0": ("unet.mid_block.resnets.0", _UNET_RESBLOCK),
        "middle_block.1": ("unet.mid_block.attentions.0", _UnetAttention(attention_heads)),
        "middle_block.2": ("unet.mid_block.resnets.1", _UNET_RESBLOCK),
        "out.0": ("unet.conv_norm_out", _PLAIN),
        "out.2": ("unet.conv_out", _PLAIN),
    }
    block = 0
    for level in range(num_levels):
        for j in range(layers_per_block):
            block += 1
            table[f"input_blocks.{block}.0"] = (f"unet.down_blocks.{level}.resnets.{j}", _UNET_RESBLOCK)
        if level < num_levels - 1:
            block += 1
            table[f"input_blocks.{block}.0.op"] = (f"unet.down_blocks.{level}.downsamplers.0.conv", _PLAIN)
    block = 0
    for up in range(num_levels):
        for j in range(layers_per_block + 1):
            table[f"output_blocks.{block}.0"] = (f"unet.up_blocks.{up}.resnets.{j}", _UNET_RESBLOCK)
            if up < num_levels - 1 and j == layers_per_block:
                table[f"output_blocks.{block}.1.conv"] = (f"unet.up_blocks.{up}.upsamplers.0.conv", _PLAIN)
            block += 1
    return table


# --- table walk ----------------------------------------------------------------------------------


def _walk(state_dict: Params, table: _ModuleTable,
          convert: Callable[[_Converter, Params], Params]) -> ConvertedStateDict:
    """Group ``state_dict`` by the modules of ``table`` (source path -> (target path, converter))."""
    grouped: dict[str, Params] = defaultdict(dict)
    skipped = []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        module = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in table), None)
        if module is None:
            skipped.append(key)
        else:
            grouped[module][key[len(module) + 1:]] = tensor
    out = {}
    for module, params in grouped.items():
        target, converter = table[module]
        out.update({f"{target}.{name}": t for name, t in convert(converter, params).items()})
    return ConvertedStateDict(out, skipped)


def _inverse(table: _ModuleTable) -> _ModuleTable:
    return {ours: (ldm, converter) for ldm, (ours, converter) in table.items()}


def _strip_prefix(state_dict: Params, prefix: str) -> tuple[Params, list[str]]:
    """Keep the keys under ``prefix`` (without it) if any key has it; others are reported as skipped."""
    if not any(k.startswith(prefix) for k in state_dict):
        return state_dict, []
    kept = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return kept, [k for k in state_dict if not k.startswith(prefix)]


def ldm_autoencoder_to_diffusers(state_dict: Params, num_levels: int = 3,
                                 layers_per_block: int = 2) -> ConvertedStateDict:
    """LDM VQ/KL autoencoder state dict -> diffusers ``VQModel``/``AutoencoderKL`` state dict.

    Accepts the autoencoder's own checkpoint or a full LDM checkpoint (keys under
    ``first_stage_model.``). Training-only ``loss.*`` keys (and everything else without a
    counterpart) are returned in ``skipped``.
    """
    state_dict, skipped = _strip_prefix(state_dict, LDM_FIRST_STAGE_PREFIX)
    result = _walk(state_dict, _autoencoder_table(num_levels, layers_per_block), lambda c, p: c.to_ours(p))
    prefix = LDM_FIRST_STAGE_PREFIX if skipped else ""
    return ConvertedStateDict(result.state_dict, skipped + [prefix + k for k in result.skipped])


def diffusers_to_ldm_autoencoder(state_dict: Params, num_levels: int = 3,
                                 layers_per_block: int = 2) -> ConvertedStateDict:
    """Inverse of :func:`ldm_autoencoder_to_diffusers` (LDM names without prefix)."""
    table = _inverse(_autoencoder_table(num_levels, layers_per_block))
    return _walk(state_dict, table, lambda c, p: c.to_ldm(p))


def ldm_unet_to_style_unet(state_dict: Params, num_levels: int = 3, layers_per_block: int = 2,
                           attention_heads: int = 8) -> ConvertedStateDict:
    """LDM denoiser (``model.diffusion_model.*``, or bare U-Net keys) -> ``StyleUNet`` state dict.

    The defaults describe the landscape model (= the ``paper`` preset). Every other key of a full
    checkpoint is returned in ``skipped``: the autoencoder (``first_stage_model.*``), the EMA copy,
    and ``cond_stage_model.channel_mapper.weight`` (the landscape's layout encoder, built for
    another number of classes). ``StyleUNet.style_block`` has no counterpart and stays random.
    """
    state_dict, skipped = _strip_prefix(state_dict, LDM_UNET_PREFIX)
    result = _walk(state_dict, _unet_table(num_levels, layers_per_block, attention_heads), lambda c, p: c.to_ours(p))
    prefix = LDM_UNET_PREFIX if skipped else ""
    return ConvertedStateDict(result.state_dict, skipped + [prefix + k for k in result.skipped])


def style_unet_to_ldm_unet(state_dict: Params, num_levels: int = 3, layers_per_block: int = 2,
                           attention_heads: int = 8) -> ConvertedStateDict:
    """Inverse of :func:`ldm_unet_to_style_unet`: keys under ``model.diffusion_model.``; the style
    block (no LDM counterpart) is returned in ``skipped``."""
    table = _inverse(_unet_table(num_levels, layers_per_block, attention_heads))
    result = _walk(state_dict, table, lambda c, p: c.to_ldm(p))
    return ConvertedStateDict({LDM_UNET_PREFIX + k: v for k, v in result.state_dict.items()}, result.skipped)
