"""The paper card: every published number (the tables of docs/method.md) as ``preset=paper``
composes it, one by one, for each script and data setting. Composing needs no data on disk;
numbers that live in code (presets, module defaults) are read from the real objects. Where we
deviate on purpose (bf16 on clusters, DPM-Solver++ 8 for prediction, fused optimizers) the card
asserts our value and that the paper's is one documented override away."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from hydra.utils import instantiate

from conftest import compose_in
from stedm.diffusion.options import SamplingOptions, run_options
from stedm.diffusion.solvers import paper_ddim_timesteps
from stedm.models.denoiser import DENOISER_PRESETS
from stedm.models.first_stage import VQ_F4_CONFIG
from stedm.models.ssl_unet import PRESETS as SSL_PRESETS
from stedm.models.ssl_unet import SSLUNet, build_ssl_unet
from stedm.models.style import NULL_STYLE_VALUE, null_style_like
from stedm.modules.style_diffusion import StyleDiffusion
from stedm.run import batch_size, learning_rate, resolve_precision

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
HER2_CLASSES = ["Background", "HER2 0", "HER2 1+", "HER2 2+", "HER2 3+", "LCIS/DCIS"]
CATCH_CLASSES = ["Background", "Trichoblastoma", "Mast Cell Tumor", "Melanoma", "PNST", "Plasmacytoma", "SCC",
                 "Histiocytoma"]


@pytest.fixture
def paper(tmp_path):
    """``paper(script, *overrides)``: the script's config with ``preset=paper``."""
    return lambda script, *overrides: compose_in(tmp_path, script, ["preset=paper", *overrides])


def quadratic_betas(start: float, end: float, steps: int = 1000) -> torch.Tensor:
    """(linspace(sqrt(start), sqrt(end), T))^2: LDM's "linear" and GenSelfDiff's "quadratic" schedule."""
    return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2


def assert_schedule(schedule: dict, start: float, end: float) -> None:
    betas = DDPMScheduler(**schedule).betas.double()
    assert len(betas) == 1000
    torch.testing.assert_close(betas, quadratic_betas(start, end), rtol=1e-5, atol=1e-9)


# -- STEDM: diffusion --------------------------------------------------------------------------
@pytest.mark.parametrize("data", ["flowers", "her2", "catch"])
def test_train_diff_paper_numbers(paper, data):
    cfg = paper("train_diff", f"data={data}")
    assert cfg.diffusion.name == "paper"
    assert cfg.base_lr == 1e-7 and cfg.trainer.max_epochs == 25 and cfg.trainer.accumulate_grad_batches == 4
    assert cfg.data.batch_base == 2 and cfg.data.patch_size == 512 and cfg.data.samples == 10000
    model = cfg.model
    assert model.style_dropout == 0.25 and model.ema_decay == 0.9999 and model.sampling.cfg_scale == 1.5
    assert model.prediction_type == "epsilon" and model.loss == "l1"
    assert model.noise_schedule.beta_schedule == "scaled_linear" and model.noise_schedule.num_train_timesteps == 1000
    assert (model.noise_schedule.beta_start, model.noise_schedule.beta_end) == (0.0015, 0.0205)
    assert_schedule(dict(model.noise_schedule), 0.0015, 0.0205)
    assert model.layout_encoder.out_channels == 3 and model.binary_layout  # binary layout -> 3 channels
    assert model.style.encoder.backbone == "swin_v2_t" and model.style.encoder.out_dim == 512
    assert cfg.diffusion.style_dim == 512 and model.denoiser.style_dim == 512 and cfg.diffusion.style_injection == "add"
    assert model.denoiser.preset == "paper" and model.first_stage.kind == "vq_f4"


def test_learning_rate_scales_with_batch_and_gpus_not_accumulation(paper):
    for script, base in (("train_diff", 1e-7), ("train_seg", 5e-7)):
        pc, cluster = paper(script, "data=flowers", "location=pc"), paper(script, "data=flowers", "location=cluster")
        assert (batch_size(pc), batch_size(cluster)) == (2, 8)  # batch_base 2 x batch_mul (pc 1, cluster 4)
        assert learning_rate(pc, batch_size(pc), 1) == pytest.approx(base * 2)
        assert learning_rate(cluster, batch_size(cluster), 4) == pytest.approx(base * 8 * 4)
        assert cluster.trainer.accumulate_grad_batches == 4  # not in the lr


def test_denoiser_first_stage_and_null_style_numbers_in_code():
    unet = DENOISER_PRESETS["paper"]
    assert unet["block_out_channels"] == (128, 4 * 128, 8 * 128)  # 128 x (1, 4, 8)
    assert unet["layers_per_block"] == 2 and unet["attention_heads"] == 8
    assert VQ_F4_CONFIG["latent_channels"] == 3 and VQ_F4_CONFIG["num_vq_embeddings"] == 8192
    assert VQ_F4_CONFIG["block_out_channels"] == (128, 256, 512) and VQ_F4_CONFIG["layers_per_block"] == 2
    assert VQ_F4_CONFIG["scaling_factor"] == 1.0 and VQ_F4_CONFIG["mid_block_add_attention"]
    assert VQ_F4_CONFIG["down_block_types"] == ("DownEncoderBlock2D",) * 3  # no attention in the levels; f = 4
    assert NULL_STYLE_VALUE == -2.0 and null_style_like(torch.zeros(1, 2, 3, 4, 4)).eq(-2).all()
    defaults = inspect.signature(StyleDiffusion).parameters
    assert defaults["style_dropout"].default == 0.25 and defaults["ema_decay"].default == 0.9999
    assert (SamplingOptions().cfg_scale, SamplingOptions().rescale) == (1.5, 0.7)  # StyleDiffusion's default sampling


def test_swin_style_encoder_head_is_768_to_512(paper):
    encoder = instantiate(paper("train_diff").model.style.encoder)
    assert type(encoder).__name__ == "SwinTransformer"
    assert (encoder.head.in_features, encoder.head.out_features) == (768, 512)


def test_style_sampling_and_svit_numbers(paper):
    cfg = paper("train_diff", "data=her2", "style_sampling=mp", "style_agg=svit")
    assert cfg.style_sampling.source.num_patches == 10 and instantiate(cfg.style_sampling.source).num_images == 10
    svit = cfg.style_agg.aggregator
    assert (svit.patch_size, svit.dim, svit.depth, svit.heads, svit.dim_head) == (8, 256, 6, 12, 64)
    assert svit.image_size == 512 and svit.num_images == 10 and svit.out_dim == 512
    assert not cfg.style_agg.use_encoder  # the set-ViT replaces the backbone


def test_predict_diff_guidance_and_its_documented_sampler_deviation(paper):
    cfg = paper("predict_diff", "data=flowers")
    options = run_options(cfg)
    assert options.cfg_scale == 1.5 and options.rescale == 0.7 and options.guidance_mode == "stedm"
    assert cfg.num_pairs is None  # 2 x data.samples
    # ours: DPM-Solver++ with 8 model calls; the paper's DDIM-143 is `sampling=paper`, or the
    # README's `sampler=ddim steps=128` (aliases)
    assert (options.solver, options.steps) == ("dpm_solver", 8)
    ddim = run_options(paper("predict_diff", "data=flowers", "sampler=ddim", "steps=128"))
    assert ddim == run_options(paper("predict_diff", "data=flowers", "sampling=paper")).replace(name="fast")
    assert (ddim.solver, ddim.steps, ddim.spacing, ddim.cfg_scale) == ("ddim", 128, None, 1.5)
    assert len(paper_ddim_timesteps(1000, ddim.steps)) == 143
    assert "`sampler=ddim steps=128`" in README


# -- STEDM: data ---------------------------------------------------------------------------------
def test_her2_data_numbers(paper):
    data = paper("train_seg", "data=her2").data
    assert list(data.class_names) == HER2_CLASSES and data.num_classes == 6
    assert dict(data.label_dict) == {"Background": 0, "Hard Negative": 0, "Necrosis": 0, "To Verify": 0,
                                     "HER2 0": 1, "HER2 1+": 2, "HER2 2+": 3, "HER2 3+": 4, "DCIS": 5, "LCIS": 5}
    assert data.downsample == 2 and data.patch_size == 512 and data.samples == 10000
    assert {k: (v.probability, list(v.classes)) for k, v in data.locations.items()} == {
        "background": (0.5, [0]), "tumour": (0.5, [1, 2, 3, 4, 5])}
    assert 2 * data.border_crop == 64 and data.eval_overlap == 128  # training / validation overlaps


def test_catch_data_numbers(paper):
    data = paper("train_seg", "data=catch").data
    assert list(data.class_names) == CATCH_CLASSES and data.num_classes == 8
    assert dict(data.label_dict) == {"Subcutis": 0, "Epidermis": 0, "Dermis": 0, "Inflamm/Necrosis": 0,
                                     "Cartilage": 0, "Bone": 0, "Trichoblastoma": 1, "Mast Cell Tumor": 2,
                                     "Melanoma": 3, "PNST": 4, "Plasmacytoma": 5, "SCC": 6, "Histiocytoma": 7}
    assert data.downsample == 8 and data.patch_size == 512 and data.samples == 10000
    locations = {k: (v.probability, v.classes if isinstance(v.classes, str) else list(v.classes))
                 for k, v in data.locations.items()}
    assert locations == {"background": (0.4, [0]), "tumour": (0.5, [1, 2, 3, 4, 5, 6, 7]), "white": (0.1, "unannotated")}
    assert 2 * data.border_crop == 64 and data.eval_overlap == 128


# -- STEDM: segmentation -------------------------------------------------------------------------
@pytest.mark.parametrize("data", ["flowers", "her2", "catch"])
def test_train_seg_paper_numbers(paper, data):
    cfg = paper("train_seg", f"data={data}")
    assert cfg.base_lr == 5e-7 and cfg.trainer.max_epochs == 75 and cfg.trainer.accumulate_grad_batches == 4
    assert cfg.segmenter.net.arch == "Unet" and cfg.segmenter.net.encoder_name == "mit_b2"
    assert cfg.segmenter.classes == 2 and cfg.segmenter.binary
    loss = instantiate(cfg.model.loss)
    assert (cfg.model.loss.ce_weight, cfg.model.loss.dice_weight) == (0.1, 0.9)
    assert type(loss).__name__ == "SegmentationLoss"
    assert cfg.model.optimizer._target_ == "torch.optim.AdamW"


# -- deviations on purpose ---------------------------------------------------------------------
def test_cluster_precision_is_bf16_and_the_papers_fp32_is_one_override_away(paper):
    cluster = paper("train_diff", "location=cluster")
    assert cluster.location.precision == "bf16-mixed" and resolve_precision(cluster.location) == "bf16-mixed"
    fp32 = paper("train_diff", "location=cluster", "location.precision=32-true")
    assert resolve_precision(fp32.location) == "32-true"  # TF32 matmuls stay on for CUDA runs (stedm/run.py)
    assert "location.precision=32-true" in README


@pytest.mark.parametrize("script", ["train_diff", "pretrain_ssl", "finetune_ssl"])
def test_fused_optimizers_and_the_papers_default_one_is_one_override_away(paper, script):
    param = [torch.nn.Parameter(torch.zeros(2))]
    assert instantiate(paper(script).model.optimizer)(param, lr=1e-4).defaults["fused"] is True
    reference = instantiate(paper(script, "model.optimizer.fused=null").model.optimizer)(param, lr=1e-4)
    assert reference.defaults["fused"] is None
    assert "`model.optimizer.fused=null`" in README


# -- GenSelfDiff-HIS -----------------------------------------------------------------------------
def test_ssl_unet_preset_is_the_papers_network(paper):
    assert paper("pretrain_ssl", "data=glas").model.net.preset == "default"
    assert SSL_PRESETS["default"] == {"dim": 64, "dim_mults": (1, 2, 4, 8)}
    defaults = inspect.signature(SSLUNet).parameters  # linear attention 4 heads x 32, GroupNorm(8)
    assert (defaults["attn_heads"].default, defaults["attn_head_dim"].default, defaults["norm_groups"].default) == \
        (4, 32, 8)
    assert build_ssl_unet("default").config["init_dim"] == 42  # 7x7 stem to 42 channels


@pytest.mark.parametrize("data", ["glas", "monuseg"])
def test_pretrain_ssl_paper_numbers(paper, data):
    cfg = paper("pretrain_ssl", f"data={data}")
    assert cfg.trainer.max_epochs == 100 and cfg.lr == 1e-4 and cfg.ssl_net.ema_decay == 0.9999
    assert cfg.data.batch_base == 8 and cfg.data.patch_size == 256 and cfg.data.augment.flips
    assert cfg.model.prediction_type == "epsilon" and cfg.model.weighting == "p2"
    assert (cfg.model.p2_k, cfg.model.p2_gamma) == (1.0, 1.0)
    assert cfg.model.sampling.solver == "ddpm" and cfg.model.sampling.steps == 1000
    module = instantiate(cfg.model, net=build_ssl_unet("tiny"), lr=cfg.lr)  # the real module, a tiny net
    assert module.noise_scheduler.config.num_train_timesteps == 1000
    torch.testing.assert_close(module.noise_scheduler.betas.double(), quadratic_betas(1e-4, 0.02), rtol=1e-5,
                               atol=1e-9)
    t = torch.arange(1000)
    snr = module.noise_scheduler.alphas_cumprod.double() / (1 - module.noise_scheduler.alphas_cumprod.double())
    torch.testing.assert_close(module.loss_weighting(t).double(), 1 / (1 + snr), rtol=1e-5, atol=1e-9)  # P2 k=1 γ=1
    optimizer = module.configure_optimizers()
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 1e-4
    assert optimizer.defaults["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("data", ["glas", "monuseg"])
def test_finetune_ssl_paper_numbers(paper, data):
    cfg = paper("finetune_ssl", f"data={data}", "from_scratch=true")
    assert cfg.trainer.max_epochs == 150 and cfg.lr == 1e-4
    assert cfg.data.batch_base == 8 and cfg.data.patch_size == 256
    optimizer = instantiate(cfg.model.optimizer)([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["betas"] == (0.5, 0.999)
    loss = instantiate(cfg.model.loss)
    assert loss.weights == {"focal": 1.0, "ss": 1.0, "dice": 0.0}  # focal + SS, 1 : 1
    assert (loss.focal_gamma, loss.ss_c, loss.ss_beta) == (2.0, 0.01, 0.1)
    assert cfg.data.augment.flips and cfg.data.augment.color_jitter > 0 and cfg.data.augment.blur > 0
    assert cfg.pretrained_weights == "ema" and cfg.model.net.pretrained_weights == "ema"
