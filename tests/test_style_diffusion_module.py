"""StyleDiffusion: training updates every trainable part, EMA, generation, sample grids, and
conditioning that really conditions (layout and style decide the colours of tiny toy images)."""

from __future__ import annotations

import copy
import functools

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

from stedm.data.contract import IGNORE_INDEX
from stedm.models.denoiser import build_denoiser
from stedm.models.first_stage import build_first_stage
from stedm.models.layout import LayoutEncoder
from stedm.models.style import (
    LinearAggregator,
    SetViTAggregator,
    StyleExtractor,
    build_style_encoder,
)
from stedm.modules.style_diffusion import StyleDiffusion

SIZE = 8
STYLE_DIM = 16
# One level: the style block then sits at full resolution, which the toys below learn in ~150 steps.
TINY_UNET = {"block_out_channels": (32,), "time_embedding_dim": 32, "norm_num_groups": 8, "attention_heads": 1}
RED, GREEN, BLUE = torch.tensor([1.0, -1, -1]), torch.tensor([-1.0, 1, -1]), torch.tensor([-1.0, -1, 1])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These nets are tiny: one thread is faster and does not fight other processes for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def style_extractor(kind: str, num_images: int) -> StyleExtractor:
    if kind == "svit":
        return StyleExtractor(None, SetViTAggregator(num_images, SIZE, patch_size=4, dim=32, depth=1, heads=2,
                                                     dim_head=16, mlp_dim=64, out_dim=STYLE_DIM))
    encoder = build_style_encoder("timm:test_resnet", out_dim=STYLE_DIM)
    return StyleExtractor(encoder, LinearAggregator(num_images, STYLE_DIM))


def make_module(style: str | None = "linear", num_images: int = 2, **kwargs) -> StyleDiffusion:
    denoiser = build_denoiser("tiny", style_dim=STYLE_DIM, style_injection="add" if style else None, **TINY_UNET)
    return StyleDiffusion(
        denoiser, build_first_stage("identity"), LayoutEncoder(2),
        style_extractor(style, num_images) if style else None,
        optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.0), **{"lr": 1e-3, **kwargs})


def random_samples(n: int, num_images: int | None = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        sample = {"image": torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1,
                  "mask": torch.randint(0, 3, (SIZE, SIZE), generator=g)}
        if num_images:
            sample["style"] = torch.rand(num_images, 3, SIZE, SIZE, generator=g) * 2 - 1
        samples.append(sample)
    return samples


def fit(module: StyleDiffusion, samples: list[dict], root, max_steps: int, batch_size: int = 4,
        **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         **trainer_kwargs)
    trainer.fit(module, DataLoader(samples, batch_size=batch_size, shuffle=True))
    return trainer


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A style model after 3 optimizer steps (EMA now differs from the live weights)."""
    pl.seed_everything(0)
    module = make_module(ema_decay=0.9, sampling={"solver": "ddim", "steps": 8})
    fit(module, random_samples(12), tmp_path_factory.mktemp("trained"), max_steps=3)
    return module


# ---------------------------------------------------------------------------------------- training
def test_one_step_trains_denoiser_layout_encoder_style_encoder_and_aggregator(tmp_path):
    pl.seed_everything(0)
    module = make_module()
    parts = {"denoiser": module.denoiser, "layout encoder": module.layout_encoder,
             "style encoder": module.style.encoder, "aggregator": module.style.aggregator}
    before = {name: snapshot(part) for name, part in parts.items()}
    trainer = fit(module, random_samples(4), tmp_path, max_steps=1)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for name, part in parts.items():
        assert changed(part, before[name]), f"{name} was not optimised"
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.parameters() if p.requires_grad}


@pytest.mark.parametrize("prediction_type,loss", [("epsilon", "l1"), ("v_prediction", "l2")])
def test_model_without_style_trains_and_generates(tmp_path, prediction_type, loss):
    pl.seed_everything(0)
    module = make_module(style=None, prediction_type=prediction_type, loss=loss, sampling={"solver": "ddim", "steps": 5})
    before = snapshot(module.denoiser)
    trainer = fit(module, random_samples(4, num_images=None), tmp_path, max_steps=1)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert changed(module.denoiser, before)
    images = module.generate(torch.zeros(2, SIZE, SIZE, dtype=torch.long))
    assert images.shape == (2, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="style"):
        module.generate(torch.zeros(2, SIZE, SIZE, dtype=torch.long), torch.zeros(2, 1, 3, SIZE, SIZE))


def test_ema_updates_once_per_optimizer_step_and_survives_a_checkpoint(tmp_path):
    pl.seed_everything(0)
    module = make_module(ema_decay=0.9)
    trainer = fit(module, random_samples(16), tmp_path, max_steps=3, batch_size=2, accumulate_grad_batches=2)
    assert module.ema.optimization_step == 3
    live = [p.detach().clone() for p in module.parameters() if p.requires_grad]
    assert any(not torch.equal(s, p) for s, p in zip(module.ema.shadow_params, live))

    with module.ema_weights():
        inside = [p.detach().clone() for p in module.parameters() if p.requires_grad]
    assert all(torch.equal(i, s) for i, s in zip(inside, module.ema.shadow_params))
    assert all(torch.equal(p, b) for p, b in zip((p for p in module.parameters() if p.requires_grad), live))

    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    fresh = make_module()  # other random weights; everything must come from the checkpoint
    loaded = StyleDiffusion.load_from_checkpoint(
        path, denoiser=fresh.denoiser, first_stage=fresh.first_stage, layout_encoder=fresh.layout_encoder,
        style=fresh.style)
    assert loaded.hparams.ema_decay == 0.9 and loaded.ema.optimization_step == 3
    assert all(torch.equal(a, b) for a, b in zip(loaded.ema.shadow_params, module.ema.shadow_params))
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), module.parameters()))


def test_checkpoint_without_ema_starts_the_ema_from_its_weights(tmp_path):
    pl.seed_everything(0)
    module = make_module(style=None, ema_decay=None)
    trainer = fit(module, random_samples(4, num_images=None), tmp_path, max_steps=1)
    trainer.save_checkpoint(tmp_path / "no_ema.ckpt")
    fresh = make_module(style=None)
    loaded = StyleDiffusion.load_from_checkpoint(
        tmp_path / "no_ema.ckpt", denoiser=fresh.denoiser, first_stage=fresh.first_stage,
        layout_encoder=fresh.layout_encoder, style=None, ema_decay=0.9999)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert all(torch.equal(s, p) for s, p in zip(loaded.ema.shadow_params, trainable))


def test_sample_grid_is_written_every_n_steps(tmp_path):
    pl.seed_everything(0)
    module = make_module(num_images=2, sample_every_n_steps=2, num_sample_images=3, sampling={"solver": "ddim", "steps": 4})
    fit(module, random_samples(8), tmp_path, max_steps=4)
    written = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert written == ["step_000002.png", "step_000004.png"]
    columns, rows, pad = 1 + 1 + 2 + 1, 3, 2  # layout | image | 2 styles | generated
    with Image.open(tmp_path / "samples" / written[0]) as grid:
        assert grid.size == (columns * (SIZE + pad) + pad, rows * (SIZE + pad) + pad)


# ---------------------------------------------------------------------------------------- generation
def test_generate_returns_clipped_images_and_guidance_switches_off_at_scale_one(trained):
    mask = torch.randint(0, 2, (2, SIZE, SIZE))
    style = torch.rand(2, 2, 3, SIZE, SIZE) * 2 - 1
    images = trained.generate(mask, style)
    assert images.shape == (2, 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1
    unguided = trained.generate(mask, style, cfg_scale=1.0, rescale=0.0)
    for other in ({"rescale": 0.7}, {"guidance_mode": "diffusers"}, {"batched_guidance": False}):
        assert torch.equal(trained.generate(mask, style, cfg_scale=1.0, **other), unguided)
    guided = trained.generate(mask, style, cfg_scale=3.0, batched_guidance=True)
    assert not torch.allclose(guided, unguided)
    torch.testing.assert_close(trained.generate(mask, style, cfg_scale=3.0, batched_guidance=False), guided,
                               atol=1e-4, rtol=1e-4)


def test_shared_trunk_guidance_gives_the_two_pass_images_with_one_trunk_pass_per_step(trained):
    mask, style = torch.randint(0, 2, (2, SIZE, SIZE)), torch.rand(2, 2, 3, SIZE, SIZE) * 2 - 1
    trunk_batches = []
    hook = trained.denoiser.unet.conv_in.register_forward_hook(lambda m, i, o: trunk_batches.append(o.shape[0]))
    try:
        shared = trained.generate(mask, style, cfg_scale=2.0, solver="dpm_solver", steps=4, shared_trunk=True)
        assert trunk_batches == [2] * 4  # the layers before the style block: once per step, conditional batch only
        trunk_batches.clear()
        two_pass = trained.generate(mask, style, cfg_scale=2.0, solver="dpm_solver", steps=4, batched_guidance=False)
        assert trunk_batches == [2] * 8
    finally:
        hook.remove()
    torch.testing.assert_close(shared, two_pass, atol=1e-4, rtol=1e-4)


def test_generate_samples_with_the_ema_weights(trained):
    mask, style = torch.randint(0, 2, (2, SIZE, SIZE)), torch.rand(2, 2, 3, SIZE, SIZE) * 2 - 1
    with_ema = trained.generate(mask, style)
    live = copy.deepcopy(trained)
    live.ema = None  # now samples with the live weights
    assert not torch.allclose(live.generate(mask, style), with_ema)
    trained.ema.copy_to([p for p in live.parameters() if p.requires_grad])
    torch.testing.assert_close(live.generate(mask, style), with_ema)


def test_baked_ema_generates_what_the_ema_swap_generates(trained):
    mask, style = torch.randint(0, 2, (2, SIZE, SIZE)), torch.rand(2, 2, 3, SIZE, SIZE) * 2 - 1
    baked = copy.deepcopy(trained).bake_ema()
    assert baked.ema is None and trained.ema is not None
    torch.testing.assert_close(baked.generate(mask, style), trained.generate(mask, style))


def test_a_pairs_noise_does_not_depend_on_its_batch(trained):
    mask, style = torch.randint(0, 2, (3, SIZE, SIZE)), torch.rand(3, 2, 3, SIZE, SIZE) * 2 - 1
    batch = trained.generate(mask, style, seed=5, indices=[10, 11, 12])
    alone = trained.generate(mask[1:2], style[1:2], seed=5, indices=[11])
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], trained.generate(mask[:1], style[:1], seed=6, indices=[10])[0])


def test_generate_restores_the_training_mode(trained):
    trained.train()
    trained.generate(torch.zeros(1, SIZE, SIZE, dtype=torch.long), torch.zeros(1, 2, 3, SIZE, SIZE))
    assert trained.training and trained.denoiser.training and not trained.first_stage.training


# ---------------------------------------------------------------------------------------- inputs
def test_noise_schedule_reaches_the_scheduler():
    module = make_module(style=None, noise_schedule={"beta_start": 1e-4, "beta_end": 0.02}, prediction_type="v_prediction")
    assert module.noise_scheduler.betas[0].item() == pytest.approx(1e-4)
    assert module.noise_scheduler.betas[-1].item() == pytest.approx(0.02)
    assert module.noise_scheduler.config.prediction_type == "v_prediction"


def test_binary_layout_merges_foreground_classes_and_ignored_pixels_are_background():
    module = make_module(style=None)
    mask = torch.tensor([[[0, 1, 3, IGNORE_INDEX]]])
    onehot = module.layout_onehot(mask)
    assert onehot.shape == (1, 2, 1, 4)
    assert onehot[0, 1, 0].tolist() == [0, 1, 1, 0] and onehot[0, 0, 0].tolist() == [1, 0, 0, 1]


def test_multiclass_layout_checks_class_ids():
    denoiser = build_denoiser("tiny", style_injection=None, **TINY_UNET)
    module = StyleDiffusion(denoiser, build_first_stage("identity"), LayoutEncoder(4), None,
                            num_classes=4, binary_layout=False)
    assert module.layout_onehot(torch.tensor([[[0, 3, IGNORE_INDEX]]]))[0, :, 0].argmax(0).tolist() == [0, 3, 0]
    with pytest.raises(ValueError, match="num_classes"):
        module.layout_onehot(torch.tensor([[[0, 5]]]))


def test_inconsistent_parts_are_rejected_with_a_clear_error():
    identity = build_first_stage("identity")
    with pytest.raises(ValueError, match="style_injection"):
        StyleDiffusion(build_denoiser("tiny", style_injection="add", **TINY_UNET), identity, LayoutEncoder(2), None)
    with pytest.raises(ValueError, match="style_injection"):
        StyleDiffusion(build_denoiser("tiny", style_injection=None, **TINY_UNET), identity, LayoutEncoder(2),
                       style_extractor("svit", 1))
    with pytest.raises(ValueError, match="num_classes=2"):
        StyleDiffusion(build_denoiser("tiny", style_injection=None, **TINY_UNET), identity, LayoutEncoder(3), None)
    with pytest.raises(ValueError, match="prediction_type"):
        make_module(style=None, noise_schedule={"prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="loss"):
        make_module(style=None, loss="huber")
    with pytest.raises(ValueError, match="no 'style'"):
        make_module().training_step({"image": torch.zeros(1, 3, SIZE, SIZE),
                                     "mask": torch.zeros(1, SIZE, SIZE, dtype=torch.long)}, 0)


# ---------------------------------------------------------------------------------------- conditioning
# The toys train with v-prediction: tiny nets learn its bounded target in ~150 steps, where the
# eps target needs several times more; what is tested here is the conditioning, not the objective.
def rectangle_masks(n: int, g: torch.Generator) -> torch.Tensor:
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for mask in masks:
        r0, c0 = torch.randint(0, SIZE - 2, (2,), generator=g).tolist()
        r1 = r0 + 2 + int(torch.randint(0, SIZE - r0 - 1, (1,), generator=g))
        c1 = c0 + 2 + int(torch.randint(0, SIZE - c0 - 1, (1,), generator=g))
        mask[r0:r1, c0:c1] = 1
    return masks


def paint(masks: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    m = masks[:, None].float()
    return m * foreground.view(-1, 3, 1, 1) + (1 - m) * background.view(-1, 3, 1, 1)


def test_layout_decides_where_the_colours_go(tmp_path):
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    masks = rectangle_masks(256, g)
    images = paint(masks, RED, BLUE)  # foreground red, background blue
    module = make_module(style=None, prediction_type="v_prediction", lr=5e-3, sampling={"solver": "ddim", "steps": 25})
    fit(module, [{"image": i, "mask": m} for i, m in zip(images, masks)], tmp_path, max_steps=150, batch_size=16)

    triangle = torch.ones(SIZE, SIZE).tril().long().expand(4, SIZE, SIZE)  # no rectangle: a new layout
    out = module.generate(triangle)
    redness = out[:, 0] - out[:, 2]  # +2 for pure red, -2 for pure blue
    assert redness[triangle == 1].mean() > 1.0
    assert redness[triangle == 0].mean() < -1.0


def test_style_image_decides_the_colour(tmp_path):
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(1)
    palette = torch.stack([RED, GREEN, BLUE])
    colours = torch.randint(0, 3, (256,), generator=g)
    masks = rectangle_masks(256, g)
    images = palette[colours].view(-1, 3, 1, 1) + 0.1 * torch.randn(256, 3, SIZE, SIZE, generator=g)
    # the style image: another texture in the target's colour
    styles = (palette[colours].view(-1, 1, 3, 1, 1) + 0.2 * torch.randn(256, 1, 3, SIZE, SIZE, generator=g))
    module = make_module(style="svit", num_images=1, prediction_type="v_prediction", lr=5e-3, sampling={"solver": "ddim", "steps": 25})
    samples = [{"image": i, "mask": m, "style": s} for i, m, s in zip(images, masks, styles.clamp(-1, 1))]
    fit(module, samples, tmp_path, max_steps=150, batch_size=16)

    layout = rectangle_masks(4, g)
    for c, colour in enumerate(palette):  # same layout, same noise; only the style image changes
        mean_colour = module.generate(layout, colour.view(1, 1, 3, 1, 1).expand(4, 1, 3, SIZE, SIZE)).mean((0, 2, 3))
        others = torch.cat([mean_colour[:c], mean_colour[c + 1:]])
        assert mean_colour[c] - others.max() > 0.8, f"style {colour.tolist()} gave mean colour {mean_colour.tolist()}"
