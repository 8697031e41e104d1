"""Noise schedules, classifier-free guidance and the solvers, against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stedm.diffusion.guidance import guide, guided_model_fn
from stedm.diffusion.solvers import logsnr_timesteps, noise_for_indices, paper_ddim_timesteps, sample
from stedm.diffusion.schedules import make_scheduler, to_epsilon, training_target
from stedm.models.denoiser import build_denoiser

TINY_UNET = {"block_out_channels": (16, 32), "time_embedding_dim": 32, "norm_num_groups": 4, "attention_heads": 1}


# ---------------------------------------------------------------------------------------- schedules
def test_scaled_linear_schedule_is_linear_in_sqrt_beta():
    scheduler = make_scheduler(beta_start=0.0015, beta_end=0.0205, num_train_timesteps=1000)
    expected = np.linspace(0.0015**0.5, 0.0205**0.5, 1000) ** 2
    np.testing.assert_allclose(scheduler.betas.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), np.cumprod(1 - expected), rtol=1e-4)


def test_make_scheduler_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler(prediction_type="sample")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_converts_back_to_the_noise(prediction_type):
    scheduler = make_scheduler(prediction_type=prediction_type)
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    target = training_target(scheduler, x0, noise, t)
    if prediction_type == "v_prediction":  # v = sqrt(a) * eps - sqrt(1 - a) * x0
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)
    torch.testing.assert_close(to_epsilon(scheduler, target, x_t, t), noise, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- guidance
def _predictions(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)


@pytest.mark.parametrize("mode", ["stedm", "diffusers"])
def test_scale_one_returns_the_conditional_prediction(mode):
    eps_cond, eps_uncond = _predictions()
    assert torch.equal(guide(eps_cond, eps_uncond, 1.0, rescale=0.7, mode=mode), eps_cond)


@pytest.mark.parametrize("mode", ["stedm", "diffusers"])
def test_rescale_zero_is_plain_classifier_free_guidance(mode):
    eps_cond, eps_uncond = _predictions()
    torch.testing.assert_close(guide(eps_cond, eps_uncond, 3.0, rescale=0.0, mode=mode),
                               eps_uncond + 3.0 * (eps_cond - eps_uncond))


def _by_hand(eps_cond, eps_uncond, w, phi, mix_with):
    c, u = eps_cond.numpy().astype(np.float64), eps_uncond.numpy().astype(np.float64)
    guided = u + w * (c - u)
    out = np.empty_like(guided)
    for i in range(len(c)):  # std per sample over all non-batch dims (unbiased, like torch.std)
        rescaled = guided[i] * c[i].std(ddof=1) / guided[i].std(ddof=1)
        out[i] = phi * rescaled + (1 - phi) * (c[i] if mix_with == "cond" else guided[i])
    return out


def test_stedm_rescale_mixes_with_the_conditional_prediction():
    eps_cond, eps_uncond = _predictions()
    out = guide(eps_cond, eps_uncond, 1.5, rescale=0.7, mode="stedm")
    np.testing.assert_allclose(out.numpy(), _by_hand(eps_cond, eps_uncond, 1.5, 0.7, "cond"), rtol=1e-5, atol=1e-6)


def test_diffusers_rescale_mixes_with_the_guided_prediction():
    eps_cond, eps_uncond = _predictions()
    out = guide(eps_cond, eps_uncond, 1.5, rescale=0.7, mode="diffusers")
    np.testing.assert_allclose(out.numpy(), _by_hand(eps_cond, eps_uncond, 1.5, 0.7, "guided"), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, guide(eps_cond, eps_uncond, 1.5, rescale=0.7, mode="stedm"))


def test_guide_rejects_bad_arguments():
    eps_cond, eps_uncond = _predictions()
    with pytest.raises(ValueError, match="guidance mode"):
        guide(eps_cond, eps_uncond, 1.5, mode="karras")
    with pytest.raises(ValueError, match="rescale"):
        guide(eps_cond, eps_uncond, 1.5, rescale=1.5)


def test_batched_guidance_equals_two_passes_with_one_forward_per_step():
    torch.manual_seed(0)
    unet = build_denoiser("tiny", in_channels=6, style_dim=8, **TINY_UNET).eval()
    calls = []

    def eps_fn(x_t, t, layout, style):
        calls.append(x_t.shape[0])
        return unet(torch.cat([x_t, layout], dim=1), t, style)

    layout, style, null = torch.randn(2, 3, 8, 8), torch.randn(2, 8), torch.randn(2, 8)
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        batched = guided_model_fn(eps_fn, (layout, style), (layout, null), 1.5, 0.7, "stedm", batched=True)(x_t, t)
        assert calls == [4]
        calls.clear()
        two_pass = guided_model_fn(eps_fn, (layout, style), (layout, null), 1.5, 0.7, "stedm", batched=False)(x_t, t)
        assert calls == [2, 2]
        expected = guide(eps_fn(x_t, t, layout, style), eps_fn(x_t, t, layout, null), 1.5, 0.7, "stedm")
    torch.testing.assert_close(batched, two_pass, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(two_pass, expected)


# ---------------------------------------------------------------------------------------- samplers
def test_paper_ddim_timesteps_follow_ldm_uniform_spacing():
    timesteps = paper_ddim_timesteps(1000, 128)
    assert timesteps.tolist() == [t + 1 for t in range(0, 1000, 1000 // 128)][::-1]
    assert len(timesteps) == 143 and timesteps[0] == 995 and timesteps[-1] == 1
    for steps in (1000, 3, 105):  # the "+ 1" would reach t = T = 1000, outside the schedule
        with pytest.raises(ValueError, match=f"steps={steps} cannot use the paper spacing"):
            paper_ddim_timesteps(1000, steps)
    for steps in (1, 2, 50, 128, 200):
        assert int(paper_ddim_timesteps(1000, steps).max()) < 1000


class Oracle:
    """model_fn that returns the exact noise of a known x0 and counts its calls."""

    def __init__(self, scheduler, x0):
        self.alphas_cumprod, self.x0, self.calls = scheduler.alphas_cumprod, x0, 0
        self.first_noise = None  # the noise implied by the first call's x_t

    def __call__(self, x_t, t):
        assert t.shape == (x_t.shape[0],) and t.dtype == torch.long
        self.calls += 1
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        if self.first_noise is None:
            self.first_noise = eps
        return eps


def test_paper_ddim_makes_143_calls_and_ends_at_t0_of_the_trajectory():
    scheduler = make_scheduler()
    x0, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    oracle = Oracle(scheduler, x0)
    a = scheduler.alphas_cumprod
    x_start = a[995].sqrt() * x0 + (1 - a[995]).sqrt() * noise
    out = sample(oracle, x_start, scheduler, solver="ddim", steps=128, spacing="paper")
    assert oracle.calls == 143
    # LDM's last "previous" alpha is alphas_cumprod[0]: the result is x at t = 0 of the DDIM trajectory.
    torch.testing.assert_close(out, a[0].sqrt() * x0 + (1 - a[0]).sqrt() * noise, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("solver,spacing", [("ddim", "trailing"), ("ddim", "leading")])
def test_diffusers_ddim_recovers_x0_in_the_requested_steps(solver, spacing):
    scheduler = make_scheduler()
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    oracle = Oracle(scheduler, x0)
    out = sample(oracle, torch.randn(2, 3, 8, 8), scheduler, solver=solver, steps=12, spacing=spacing)
    assert oracle.calls == 12
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spacing", [None, "logsnr", "trailing", "linspace"])
def test_dpm_solver_ends_at_t0_like_the_paper_ddim_in_the_requested_steps(spacing):
    """With the exact noise of a known x0 the deterministic trajectory is known in closed form; the
    solver must stop where the paper's DDIM stops (t = 0 of the schedule, not pure x0)."""
    scheduler = make_scheduler()
    x0, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    oracle = Oracle(scheduler, x0)
    out = sample(oracle, noise, scheduler, solver="dpm_solver", steps=12, spacing=spacing)
    assert oracle.calls == 12
    a0 = scheduler.alphas_cumprod[0]
    torch.testing.assert_close(out, a0.sqrt() * x0 + (1 - a0).sqrt() * oracle.first_noise, atol=1e-4, rtol=1e-4)


def gaussian_eps(scheduler, data_std: float):
    """The exact eps-prediction for data ~ N(0, data_std^2): eps = sqrt(1 - a) x / (a s^2 + 1 - a)."""
    a_bar = scheduler.alphas_cumprod.double()

    def model_fn(x_t, t):
        a = a_bar[t].view(-1, 1, 1, 1)
        return ((1 - a).sqrt() * x_t / (a * data_std**2 + 1 - a)).to(x_t.dtype)

    return model_fn


@pytest.mark.parametrize("solver,steps,tolerance", [("ddim", 500, 0.02), ("ddim", 128, 0.06),
                                                     ("dpm_solver", 20, 0.015), ("dpm_solver", 10, 0.05)])
def test_solvers_solve_the_same_ode_from_the_same_noise(solver, steps, tolerance):
    """For Gaussian data the probability-flow ODE keeps x_t / sqrt(Var x_t) constant, so a sampler
    started from noise scaled to its first timestep's variance must reach noise * sqrt(Var x_0)
    at t = 0. The paper's DDIM and the fast multistep solvers (logsnr spacing) all get there
    within a few per cent, so they agree with each other (the demo model: sampler_agreement.py);
    the paper's DDIM-143 is the least exact of them."""
    scheduler = make_scheduler()
    a_bar = scheduler.alphas_cumprod.double()
    noise = noise_for_indices(range(3), seed=7, shape=(3, 8, 8)).double()
    for data_std in (0.25, 0.5, 1.0):
        variance = a_bar * data_std**2 + 1 - a_bar
        first = {"ddim": int(paper_ddim_timesteps(1000, steps)[0])}.get(solver, 999)
        out = sample(gaussian_eps(scheduler, data_std), (noise * variance[first].sqrt()).float(), scheduler,
                     solver=solver, steps=steps)
        relative = (out.double() / (noise * variance[0].sqrt()) - 1).abs().max()
        assert relative < tolerance, (data_std, float(relative))


@pytest.mark.parametrize("steps", [1, 8, 50, 500, 999])
def test_logsnr_timesteps_descend_from_the_last_timestep_without_repeats(steps):
    scheduler = make_scheduler()
    timesteps = logsnr_timesteps(scheduler.alphas_cumprod, steps)
    assert len(timesteps) == steps and timesteps[0] == 999 and timesteps[-1] >= 1
    assert (timesteps[:-1] > timesteps[1:]).all()
    log_snr = torch.log(scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod))[timesteps]
    if steps == 8:  # few steps: uniform in log-SNR up to rounding to integer timesteps
        gaps = log_snr[1:] - log_snr[:-1]
        assert gaps.max() - gaps.min() < 0.1 * gaps.mean()
    with pytest.raises(ValueError, match="steps must lie in 1..999"):
        logsnr_timesteps(scheduler.alphas_cumprod, 1000)


def test_logsnr_spacing_beats_uniform_time_spacing_with_few_steps():
    """Why logsnr is the multistep default: with 10 steps a uniform-in-t spacing ends with one
    step across most of the low-noise range and misses the exact ODE solution far more."""
    scheduler, data_std = make_scheduler(), 0.5
    a_bar = scheduler.alphas_cumprod.double()
    variance = a_bar * data_std**2 + 1 - a_bar
    noise = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    errors = {}
    for spacing in ("logsnr", "linspace"):
        out = sample(gaussian_eps(scheduler, data_std), (noise * variance[999].sqrt()).float(), scheduler,
                     solver="dpm_solver", steps=10, spacing=spacing)
        errors[spacing] = float((out.double() / variance[0].sqrt() - 1).abs().max())
    assert errors["logsnr"] < 0.05 < errors["linspace"]


def test_ddpm_sampler_is_reproducible_with_a_generator():
    scheduler = make_scheduler(beta_start=1e-4, beta_end=0.02)
    x0, noise = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4)
    runs = [sample(Oracle(scheduler, x0), noise, scheduler, solver="ddpm", steps=20,
                   generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], x0, atol=0.05, rtol=0)


def test_sample_rejects_unknown_solver_and_paper_spacing_outside_ddim():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="solver"):
        sample(lambda x, t: x, torch.zeros(1, 3, 4, 4), scheduler, solver="euler")
    with pytest.raises(ValueError, match="paper"):
        sample(lambda x, t: x, torch.zeros(1, 3, 4, 4), scheduler, solver="dpm_solver", spacing="paper")
    with pytest.raises(ValueError, match="spacing of solver 'ddpm' must be one of"):
        sample(lambda x, t: x, torch.zeros(1, 3, 4, 4), scheduler, solver="ddpm", spacing="logsnr")


def test_noise_per_index_does_not_depend_on_the_batch():
    together = noise_for_indices([0, 1, 2, 3], seed=7, shape=(3, 4, 4))
    alone = torch.cat([noise_for_indices([i], seed=7, shape=(3, 4, 4)) for i in range(4)])
    assert together.shape == (4, 3, 4, 4)
    assert torch.equal(together, alone)
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(together, noise_for_indices([0, 1, 2, 3], seed=8, shape=(3, 4, 4)))
    assert torch.equal(noise_for_indices(torch.tensor([2]), seed=7, shape=(3, 4, 4))[0], together[2])
