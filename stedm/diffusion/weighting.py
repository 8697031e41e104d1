"""Per-timestep loss weights λ_t for diffusion training: P2, min-SNR, none.

P2 (Choi et al., 2022; GenSelfDiff-HIS uses k = 1, γ = 1) and min-SNR (Hang et al., 2023; γ = 5)
are defined as weights of the ε-prediction MSE. For v-prediction they are converted so that the
weighted objective stays the same: with SNR = ᾱ/(1 − ᾱ), ``||ε − ε̂||² = SNR/(SNR + 1) · ||v − v̂||²``.
``none`` is the plain ("simple") MSE on whatever the network predicts.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr
from torch import nn

from stedm.diffusion.schedules import PREDICTION_TYPES

WEIGHTINGS = ("p2", "min_snr", "none")


def p2_weights(snr: torch.Tensor, k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """P2 weight of the ε-loss: ``1 / (k + SNR) ** gamma`` (``= 1 - ᾱ`` for k = γ = 1)."""
    return (k + snr) ** -gamma


def min_snr_weights(snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-γ weight of the ε-loss: ``min(SNR, γ) / SNR``."""
    return snr.clamp(max=gamma) / snr


def epsilon_to_prediction_factor(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Factor that turns a weight of the ε-MSE into the same objective on ``prediction_type``'s MSE."""
    if prediction_type == "epsilon":
        return torch.ones_like(snr)
    if prediction_type == "v_prediction":
        return snr / (snr + 1)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got '{prediction_type}'")


class LossWeighting(nn.Module):
    """Table of λ_t for every training timestep of ``scheduler``; ``forward(timesteps) -> λ`` (float32).

    ``scheduler`` is any diffusers scheduler with ``alphas_cumprod`` and ``config.num_train_timesteps``.
    """

    def __init__(
        self,
        scheduler,
        weighting: str = "p2",
        prediction_type: str = "epsilon",
        p2_k: float = 1.0,
        p2_gamma: float = 1.0,
        min_snr_gamma: float = 5.0,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got '{weighting}'")
        snr = compute_snr(scheduler, torch.arange(scheduler.config.num_train_timesteps)).double()
        if weighting == "none":
            table = torch.ones_like(snr)
        else:
            eps_weights = p2_weights(snr, p2_k, p2_gamma) if weighting == "p2" else min_snr_weights(snr, min_snr_gamma)
            table = eps_weights * epsilon_to_prediction_factor(snr, prediction_type)
        self.weighting = weighting
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.table[timesteps.long()]
