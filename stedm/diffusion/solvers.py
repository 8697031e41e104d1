"""The diffusion solvers: the one sampling loop, used by prediction, the training sample grids,
benchmarks and tests (the settings a run samples with: :class:`stedm.diffusion.options.SamplingOptions`).

A solver sees the network only through ``model_fn(x_t, t) -> eps`` (``t`` a 1-D long tensor of
batch size), so guidance, layout and style live in the caller's ``model_fn``
(:func:`stedm.diffusion.guidance.guided_model_fn`) and counting network calls is trivial.

Solvers (``sampling.solver``):

``ddim`` with ``spacing="paper"``
    The original LDM DDIM (eta = 0): uniform spacing c = T // steps, timesteps
    ``range(0, T, c) + 1`` (128 requested steps -> 143 actual ones), and the "previous" alpha of
    the last step is ``alphas_cumprod[0]``, not 1, so the result is the sample at t = 0 of the
    deterministic trajectory. diffusers cannot express this spacing, hence the few lines here.
``ddim`` with a diffusers spacing (``leading`` | ``trailing`` | ``linspace``)
    diffusers' :class:`~diffusers.DDIMScheduler` (eta = 0, final alpha 1): exactly ``steps`` calls.
``dpm_solver``
    diffusers' :class:`~diffusers.DPMSolverMultistepScheduler` (DPM-Solver++, 2nd-order multistep).
``ddpm``
    diffusers' ancestral :class:`~diffusers.DDPMScheduler` (GenSelfDiff-HIS' 1000-step sampler);
    the only stochastic one, pass ``generator`` for reproducible runs.

All of them are built from the betas of the training scheduler. ``dpm_solver`` places its
steps uniformly in log-SNR by default (spacing ``logsnr``, DPM-Solver's recommendation: with few
steps, uniform-in-t spacings leave one huge last step), at integer timesteps so the network sees
exactly the noise level the solver assumes, and ends at t = 0 of the training schedule
(``final_sigmas_type`` ``sigma_min``), where the paper's DDIM ends too: both solve the same ODE
over the same interval, so their results can be compared pair by pair
(``benchmarks/sampler_agreement.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from stedm.diffusion.guidance import ModelFn

SOLVERS = ("ddim", "dpm_solver", "ddpm")
LOGSNR = "logsnr"  # steps uniform in log-SNR (dpm_solver)
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")

Progress = Callable[[Iterable], Iterable]


def paper_ddim_timesteps(num_train_timesteps: int = 1000, steps: int = 128) -> torch.Tensor:
    """LDM's "uniform" DDIM timesteps, in sampling (descending) order.

    ``c = T // steps``; ``range(0, T, c) + 1``. For T = 1000 and 128 steps: c = 7, 143 timesteps
    995, 988, ..., 8, 1.
    """
    stride = num_train_timesteps // steps if steps >= 1 else 0
    # Where the stride divides T - 1 (e.g. steps 3, 9, 27, 101..111, 251..1000 for T = 1000) the
    # "+ 1" reaches t = T, outside the schedule: LDM indexes out of range there; we refuse.
    if stride < 1 or (num_train_timesteps - 1) % stride == 0:
        raise ValueError(
            f"steps={steps} cannot use the paper spacing with T={num_train_timesteps} (its last timestep "
            "would be T); choose another step count, or a diffusers spacing (leading | trailing | linspace)")
    return (torch.arange(0, num_train_timesteps, stride) + 1).flip(0)


def noise_for_indices(
    indices: Sequence[int] | torch.Tensor,
    seed: int,
    shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Starting noise ``len(indices) x *shape``; sample i depends only on (seed, indices[i]).

    Each sample draws from its own CPU generator, so pair i gets the same noise whatever the
    batch size, the number of processes or the device.
    """
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    noises = []
    for index in indices:
        if seed < 0 or index < 0:
            raise ValueError(f"seed and indices must be non-negative, got seed={seed}, index={index}")
        # SeedSequence hashes the pair, so (seed, index) and (seed + 1, index - k) never collide.
        state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator(device="cpu").manual_seed(int(state))
        noises.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(noises).to(device=device, dtype=dtype)


def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    scheduler: DDPMScheduler,
    solver: str = "ddim",
    steps: int = 128,
    spacing: str | None = None,
    progress: Progress | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run ``solver`` from ``noise`` (B x C x h x w) and return the clean latent x0.

    ``scheduler`` is the training scheduler (its betas define every solver). ``spacing`` None
    means ``paper`` for ``ddim``, ``logsnr`` for ``dpm_solver``, diffusers' default for ``ddpm``.
    ``progress`` wraps the timestep iterable (e.g. ``tqdm``). ``generator`` drives the noise of
    ``ddpm`` only.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    progress = progress or (lambda steps_: steps_)
    if solver == "ddim" and spacing in (None, "paper"):
        timesteps = paper_ddim_timesteps(scheduler.config.num_train_timesteps, steps)
        return _ddim_paper(model_fn, noise, scheduler.alphas_cumprod, timesteps, progress)
    return _diffusers_loop(model_fn, noise, _diffusers_scheduler(solver, scheduler, spacing, steps, noise.device),
                           progress, generator)


def logsnr_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` integer timesteps, descending from T - 1, spaced uniformly in log-SNR between
    t = T - 1 and t = 0 (the last step, to t = 0, is the solver's final one, not listed)."""
    num_train_timesteps = len(alphas_cumprod)
    if not 1 <= steps < num_train_timesteps:
        raise ValueError(f"steps must lie in 1..{num_train_timesteps - 1}, got {steps}")
    a = alphas_cumprod.double()
    log_snr = torch.log(a / (1 - a))  # decreasing in t
    grid = torch.linspace(float(log_snr[-1]), float(log_snr[0]), steps + 1, dtype=torch.float64)[:-1]
    nearest = torch.searchsorted(-log_snr, -grid).clamp(1, num_train_timesteps - 1)
    timesteps: list[int] = []
    for k, t in enumerate(nearest.tolist()):
        # strictly descending and leaving room for the steps still to come (many steps crowd
        # near t = 0, where log-SNR changes fastest)
        highest = timesteps[-1] - 1 if timesteps else num_train_timesteps - 1
        timesteps.append(min(max(t, steps - k), highest))
    return torch.tensor(timesteps)


def _ddim_paper(
    model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, progress: Progress
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) exactly as LDM's ``DDIMSampler`` steps it."""
    alphas_cumprod = alphas_cumprod.to(device=x.device, dtype=torch.float32)
    timesteps = timesteps.to(x.device)
    alphas = alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas[1:], alphas_cumprod[:1]])
    for t, a_t, a_prev in progress(list(zip(timesteps, alphas, alphas_prev))):
        eps = model_fn(x, t.expand(x.shape[0]))
        x0 = (x - (1 - a_t).sqrt().to(x.dtype) * eps) / a_t.sqrt().to(x.dtype)
        x = a_prev.sqrt().to(x.dtype) * x0 + (1 - a_prev).sqrt().to(x.dtype) * eps
    return x


def _diffusers_scheduler(solver: str, scheduler: DDPMScheduler, spacing: str | None, steps: int,
                       device: torch.device):
    """The diffusers scheduler of ``solver``, its ``steps`` timesteps set on ``device``."""
    allowed = (*DIFFUSERS_SPACINGS, LOGSNR) if solver == "dpm_solver" else DIFFUSERS_SPACINGS
    if spacing == "paper":
        raise ValueError(f"spacing 'paper' exists for solver 'ddim' only; {solver!r} takes {allowed}")
    if spacing is not None and spacing not in allowed:
        raise ValueError(f"spacing of solver {solver!r} must be one of {allowed}, got {spacing!r}")
    # The model_fn always returns eps, whatever the network was trained to predict.
    overrides = {"prediction_type": "epsilon", "trained_betas": scheduler.betas.tolist()}
    if spacing is not None and spacing != LOGSNR:
        overrides["timestep_spacing"] = spacing
    if solver == "ddim":
        diffusers_scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False, set_alpha_to_one=True,
                                                        **overrides)
    elif solver == "dpm_solver":  # ends at t = 0 like the paper's DDIM
        diffusers_scheduler = DPMSolverMultistepScheduler.from_config(
            scheduler.config, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min", **overrides)
    else:
        diffusers_scheduler = DDPMScheduler.from_config(scheduler.config, clip_sample=False, **overrides)
    if solver == "dpm_solver" and spacing in (None, LOGSNR):
        timesteps = logsnr_timesteps(scheduler.alphas_cumprod, steps).tolist()
        diffusers_scheduler.set_timesteps(timesteps=timesteps, device=device)
    else:
        diffusers_scheduler.set_timesteps(steps, device=device)
    return diffusers_scheduler


def _diffusers_loop(
    model_fn: ModelFn,
    x: torch.Tensor,
    scheduler,
    progress: Progress,
    generator: torch.Generator | None,
) -> torch.Tensor:
    x = x * scheduler.init_noise_sigma
    for t in progress(scheduler.timesteps):
        eps = model_fn(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x
