"""First stages: the frozen autoencoders between pixel space and the diffusion latent space."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

from diffusers import AutoencoderKL, VQModel
from torch import Tensor, nn

from stedm.models.cards import card_path, read_card
from stedm.models.ldm_convert import ldm_autoencoder_to_diffusers, load_ldm_checkpoint
from stedm.models.weights import load_strict, read_state_dict

log = logging.getLogger(__name__)

#: The LDM vq-f4 autoencoder (3 latent channels, codebook 8192, channels 128/256/512, 2 res blocks
#: per level, attention only in the middle of encoder and decoder, latent scale factor 1.0).
VQ_F4_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(128, 256, 512), layers_per_block=2,
    act_fn="silu", latent_channels=3, num_vq_embeddings=8192, norm_num_groups=32, scaling_factor=1.0,
    mid_block_add_attention=True,
)
#: The diffusers class of each trainable first-stage kind.
MODEL_CLASSES: dict[str, type] = {"vq_f4": VQModel, "kl": AutoencoderKL}


class FirstStage(nn.Module, ABC):
    """A frozen autoencoder: ``encode(x: B x 3 x H x W in [-1, 1]) -> z: B x latent_channels x
    H/downsample_factor x W/downsample_factor`` (already multiplied by ``scale_factor``) and
    ``decode(z) -> x`` (not clipped: the caller clips to [-1, 1]).

    Its parameters never train and it stays in eval mode when a parent module calls ``.train()``.
    ``kind`` is ``identity``, ``vq_f4`` or ``kl`` (what :func:`build_first_stage` takes).
    """

    kind: str
    latent_channels: int
    downsample_factor: int
    scale_factor: float

    def freeze(self) -> FirstStage:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FirstStage:
        return super().train(False)

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor: ...

    @abstractmethod
    def decode(self, z: Tensor) -> Tensor: ...


class IdentityFirstStage(FirstStage):
    """Pixel-space diffusion: the latent is the image itself."""

    kind, latent_channels, downsample_factor, scale_factor = "identity", 3, 1, 1.0

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z


class DiffusersFirstStage(FirstStage):
    """A diffusers ``VQModel`` or ``AutoencoderKL``. VQ decoding quantizes the latent first; KL
    encoding samples the posterior (as LDM does for training latents)."""

    def __init__(self, model: VQModel | AutoencoderKL):
        super().__init__()
        self.model = model
        self.kind = kind_of(model)
        cfg = model.config
        self.latent_channels = cfg.latent_channels
        self.downsample_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scale_factor = float(cfg.scaling_factor)
        self.freeze()

    def encode(self, x: Tensor) -> Tensor:
        if self.kind == "kl":
            z = self.model.encode(x).latent_dist.sample()
        else:
            z = self.model.encode(x).latents
        return z * self.scale_factor

    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z / self.scale_factor).sample


def kind_of(model: VQModel | AutoencoderKL) -> str:
    """``vq_f4`` for a ``VQModel``, ``kl`` for an ``AutoencoderKL``."""
    return "vq_f4" if isinstance(model, VQModel) else "kl"


def model_class(kind: str) -> type:
    """The diffusers class of first stage ``kind`` (``vq_f4`` | ``kl``); other kinds are refused."""
    if kind not in MODEL_CLASSES:
        raise ValueError(f"first stage kind={kind!r}; choose 'identity', 'vq_f4' or 'kl'")
    return MODEL_CLASSES[kind]


def architecture(model: VQModel | AutoencoderKL) -> dict[str, Any]:
    """``{"kind", "config"}`` that rebuilds ``model`` (what a model card records)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(model.config).items() if not k.startswith("_")}
    return {"kind": kind_of(model), "config": config}


def build_model(kind: str, config: dict[str, Any]) -> VQModel | AutoencoderKL:
    return model_class(kind)(**({**VQ_F4_CONFIG, **config} if kind == "vq_f4" else config))


def build_first_stage(kind: str = "identity", weights_path: str | None = None, allow_random: bool = False,
                      **kwargs: Any) -> FirstStage:
    """The first stage ``kind``: ``identity`` | ``vq_f4`` | ``kl``.

    ``kwargs`` override the architecture (``VQModel`` arguments on top of :data:`VQ_F4_CONFIG`
    for ``vq_f4``, ``AutoencoderKL`` arguments for ``kl``). ``weights_path``: an existing path is
    a local diffusers model folder (its own config then defines the architecture), a
    ``.safetensors`` file with a STEDM model card (``python -m stedm.train_first_stage``, the
    weights cache: the card defines the architecture) or an original LDM checkpoint file
    (autoencoder or full model), converted on load; any other value is a weights-cache name
    (:mod:`stedm.weights_cache`). ``allow_random`` (never passed on to diffusers): a cache name
    that is not in the cache gives random weights, with a warning, instead of an error;
    ``train_diff.py`` refuses a random first stage without it (:func:`stedm.tasks.diffusion.check_first_stage`).
    """
    if kind == "identity":
        if weights_path is not None or kwargs:
            raise ValueError("first stage 'identity' takes no weights_path and no architecture arguments")
        return IdentityFirstStage()
    model_cls = model_class(kind)
    path = None
    if weights_path is not None:
        from stedm.weights_cache import resolve

        try:
            path = resolve(str(weights_path), "diffusion.first_stage.weights_path")
        except FileNotFoundError as err:
            if not allow_random:
                raise
            log.warning("RANDOM FIRST STAGE (diffusion.first_stage.allow_random=true): %s", err)
    if path is not None and path.is_dir():
        if kwargs:
            raise ValueError(f"weights_path={weights_path!r} is a diffusers folder whose config defines the "
                             f"architecture; drop the arguments {sorted(kwargs)}")
        return DiffusersFirstStage(model_cls.from_pretrained(path, local_files_only=True))
    card = read_card(path) if path is not None and path.suffix == ".safetensors" else None
    if card is not None:
        stored = (card.get("model") or {}).get("first_stage")
        if not stored:
            raise ValueError(f"diffusion.first_stage.weights_path={weights_path!r}: its card {card_path(path).name} "
                             f"describes no first stage (task {card.get('task')!r})")
        if stored["kind"] != kind or kwargs:
            raise ValueError(f"diffusion.first_stage.weights_path={weights_path!r} holds a {stored['kind']!r} first "
                             f"stage whose card defines the architecture; set diffusion.first_stage.kind="
                             f"{stored['kind']} and drop the arguments {sorted(kwargs)}")
        model = build_model(kind, stored["config"])
        load_strict(model, read_state_dict(path, "diffusion.first_stage.weights_path"),
                    f"weights_path={weights_path!r}")
        return DiffusersFirstStage(model)
    model = build_model(kind, kwargs)
    if path is not None:
        cfg = model.config
        converted = ldm_autoencoder_to_diffusers(load_ldm_checkpoint(path),
                                                 num_levels=len(cfg.block_out_channels),
                                                 layers_per_block=cfg.layers_per_block)
        load_strict(model, converted.state_dict, f"weights_path={weights_path!r}")
    return DiffusersFirstStage(model)
