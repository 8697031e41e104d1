"""Loss weighting (P2, min-SNR) and the fine-tuning losses (focal, structural similarity)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from segmentation_models_pytorch.losses import DiceLoss

from stedm.data.contract import IGNORE_INDEX
from stedm.losses.diffusion import LossWeighting
from stedm.losses.finetune import FocalSSLoss, focal_loss, structural_similarity_loss


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="scaled_linear")


def test_schedule_is_the_papers_quadratic_one(scheduler):
    expected = torch.linspace(1e-4**0.5, 0.02**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.betas.double(), expected, rtol=1e-5, atol=1e-8)


def test_p2_with_k_and_gamma_one_is_one_minus_alpha_bar(scheduler):
    t = torch.arange(1000)
    torch.testing.assert_close(LossWeighting(scheduler, "p2")(t), 1 - scheduler.alphas_cumprod, rtol=1e-5, atol=1e-6)
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    torch.testing.assert_close(LossWeighting(scheduler, "p2", p2_k=0.5, p2_gamma=2.0)(t), (0.5 + snr) ** -2.0,
                               rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(LossWeighting(scheduler, "min_snr")(t), snr.clamp(max=5) / snr, rtol=1e-5, atol=1e-6)
    assert torch.equal(LossWeighting(scheduler, "none")(t), torch.ones(1000))
    with pytest.raises(ValueError, match="weighting must be one of"):
        LossWeighting(scheduler, "p3")


@pytest.mark.parametrize("weighting", ["p2", "min_snr"])
def test_weighting_gives_the_same_objective_for_v_prediction(scheduler, weighting):
    """A denoiser's x0 estimate scores the same weighted loss whichever quantity it is written as."""
    torch.manual_seed(0)
    t = torch.tensor([5, 300, 990])
    a = scheduler.alphas_cumprod[t].double().view(-1, 1)
    x0, eps, x0_hat = torch.randn(3, 8).double(), torch.randn(3, 8).double(), torch.randn(3, 8).double()
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    eps_hat = (xt - a.sqrt() * x0_hat) / (1 - a).sqrt()
    errors = {
        "epsilon": ((eps - eps_hat) ** 2).mean(1),
        # v = √ᾱ ε − √(1−ᾱ) x0
        "v_prediction": ((a.sqrt() * (eps - eps_hat) - (1 - a).sqrt() * (x0 - x0_hat)) ** 2).mean(1),
    }
    reference = LossWeighting(scheduler, weighting, "epsilon")(t).double() * errors["epsilon"]
    other = LossWeighting(scheduler, weighting, "v_prediction")(t).double() * errors["v_prediction"]
    torch.testing.assert_close(other, reference, rtol=1e-4, atol=1e-10)


def test_focal_loss_matches_hand_computation_and_ignores_pixels():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]]).T.reshape(1, 2, 1, 3)
    target = torch.tensor([[[0, 0, IGNORE_INDEX]]])
    p0 = math.exp(2) / (math.exp(2) + 1)  # pixel 1: p of class 0
    p1 = 1 / (1 + math.exp(1))  # pixel 2: p of class 0
    expected = (-(1 - p0) ** 2 * math.log(p0) - (1 - p1) ** 2 * math.log(p1)) / 2
    assert focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(-(math.log(p0) + math.log(p1)) / 2, rel=1e-6)


def reference_ss_loss(logits, target, beta=0.1, c=0.01, ignore=IGNORE_INDEX):
    """The SS loss written out with Python loops over images, classes and pixels."""
    num, selected_sum = 0, 0.0
    b_count, k_count, h, w = logits.shape
    for b in range(b_count):
        pixels = [(i, j) for i in range(h) for j in range(w) if target[b, i, j] != ignore]
        probs = {px: torch.softmax(logits[b, :, px[0], px[1]].double(), 0) for px in pixels}
        for k in range(k_count):
            y = [float(target[b, i, j] == k) for i, j in pixels]
            p = [probs[px][k].item() for px in pixels]

            def standard(values):
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
                return [(v - mean + c) / (std + c) for v in values]

            e = [abs(u - v) for u, v in zip(standard(y), standard(p), strict=True)]
            for (i, j), e_px in zip(pixels, e, strict=True):
                if e_px > beta * max(e):
                    ce = -math.log(probs[(i, j)][int(target[b, i, j])].item())
                    selected_sum += e_px * ce
                    num += 1
    return selected_sum / max(num, 1)


def test_ss_loss_matches_its_definition():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 5) * 2
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :3] = IGNORE_INDEX
    expected = reference_ss_loss(logits, target)
    assert structural_similarity_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_ss_loss_is_zero_when_structure_matches_even_if_confidence_does_not():
    # one class everywhere, same (unconfident) prediction everywhere: standardised maps agree, e = 0
    logits = torch.tensor([0.3, 0.1]).view(1, 2, 1, 1).expand(1, 2, 3, 3).clone()
    target = torch.zeros(1, 3, 3, dtype=torch.long)
    assert structural_similarity_loss(logits, target).item() == pytest.approx(0.0, abs=1e-5)  # float noise only
    assert focal_loss(logits, target).item() > 0.1


def test_extreme_logits_give_finite_losses_and_gradients():
    target = torch.tensor([[[0, 1], [1, IGNORE_INDEX]]])
    for values in ([1e4, -1e4], [-1e4, 1e4]):  # confident right and confidently wrong
        logits = torch.tensor(values).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone().requires_grad_(True)
        loss = FocalSSLoss(dice_weight=1.0)(logits, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    saturated = torch.full((1, 2, 2, 2), -1e4)
    saturated[:, 0] = 1e4
    saturated.requires_grad_(True)
    structural_similarity_loss(saturated, target).backward()  # constant softmax maps: σ = 0
    assert torch.isfinite(saturated.grad).all()


def test_combined_loss_is_independent_of_batch_size_and_ignored_pixels():
    torch.manual_seed(2)
    loss_fn = FocalSSLoss(focal_weight=1.0, ss_weight=1.0, dice_weight=0.5)
    logits = torch.randn(2, 3, 6, 6)
    target = torch.randint(0, 3, (2, 6, 6))
    target[1, :2] = IGNORE_INDEX
    loss = loss_fn(logits, target)
    torch.testing.assert_close(loss_fn(logits.repeat(2, 1, 1, 1), target.repeat(2, 1, 1)), loss)
    changed = logits.clone()
    changed[1, :, :2] = 100 * torch.randn(3, 2, 6)  # logits at ignored pixels do not matter
    torch.testing.assert_close(loss_fn(changed, target), loss)
    terms = loss_fn.terms(logits, target)
    dice = DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE_INDEX)(logits, target)
    torch.testing.assert_close(terms["dice"], dice)
    torch.testing.assert_close(loss, terms["focal"] + terms["ss"] + 0.5 * dice)


def test_fully_ignored_batch_gives_zero_loss_with_a_graph():
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = FocalSSLoss()(logits, torch.full((1, 3, 3), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
