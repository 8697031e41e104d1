"""Noise schedules and the two ways a denoiser's output is parameterised.

One :class:`~diffusers.DDPMScheduler` holds the betas of a model; training draws noisy samples
from it and every solver (:mod:`stedm.diffusion.solvers`) is built from the same betas. Both
diffusion modules take the schedule in one shape, ``noise_schedule`` = the keyword arguments of
:func:`make_scheduler` except ``prediction_type`` (which each module takes on its own).

The schedules of the two methods are both diffusers' ``scaled_linear`` (linear in sqrt(beta)):
STEDM / LDM ``linear`` uses beta 0.0015 -> 0.0205, GenSelfDiff-HIS ``quadratic`` 1e-4 -> 0.02
(:data:`SCHEDULES`, the modules' defaults; ``conf/`` states them again as the paper's numbers).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction")
#: the two methods' schedules, in the ``noise_schedule`` shape
SCHEDULES = {
    "stedm": {"beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0205, "num_train_timesteps": 1000},
    "genselfdiff": {"beta_schedule": "scaled_linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000},
}


def make_scheduler(prediction_type: str = "epsilon", **noise_schedule: Any) -> DDPMScheduler:
    """The training scheduler of ``noise_schedule`` (keys of :data:`SCHEDULES`; those not given
    are STEDM's, LDM "linear" in sqrt(beta))."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    unknown = sorted(set(noise_schedule) - set(SCHEDULES["stedm"]))
    if unknown:
        raise ValueError(f"noise_schedule: unknown key(s) {unknown}; known: {sorted(SCHEDULES['stedm'])}")
    return DDPMScheduler(**{**SCHEDULES["stedm"], **noise_schedule}, prediction_type=prediction_type,
                         clip_sample=False)


def _alpha_bar(scheduler: DDPMScheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod at ``timesteps``, shaped to broadcast against ``like`` (B x ...)."""
    alpha_bar = scheduler.alphas_cumprod.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return alpha_bar.reshape(-1, *([1] * (like.ndim - 1)))


def training_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the denoiser learns to output: the noise, or v = sqrt(a)*noise - sqrt(1-a)*x0."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, timesteps)


def to_epsilon(
    scheduler: DDPMScheduler, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Turn a denoiser output into a noise prediction, so guidance and samplers see one form.

    For v-prediction: eps = sqrt(a)*v + sqrt(1-a)*x_t (a = alphas_cumprod[t]).
    """
    if scheduler.config.prediction_type == "epsilon":
        return model_output
    alpha_bar = _alpha_bar(scheduler, timesteps, x_t)
    return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * x_t
