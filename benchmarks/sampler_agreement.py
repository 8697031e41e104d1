"""Do fast samplers give the paper's pairs? Agreement of each candidate with the paper's DDIM.

Every candidate sampler starts from the same noise as the paper's DDIM (128 requested steps =
143 model calls, style guidance at ``cfg_scale`` 1.5 with rescale 0.7, eta 0) on the same
layouts and style images, with a model trained on the demo data (``make demo`` writes one; any
``train_diff.py`` checkpoint works). All of them solve the same probability-flow ODE over the
same interval (t = 999 -> 0), so the primary criterion is how close each candidate's image is to
the DDIM image of the same noise:

- **PSNR** (dB) between the two images of each pair (range [-1, 1], peak-to-peak 2), mean and
  worst over the pairs; and, for scale, the mean PSNR of every row (the paper's DDIM included) to
  a nearly exact solution of the same ODE (``--converged``, default DPM-Solver++ with 50 steps).
- **Distribution distance to real patches**: KID (kernel inception distance's unbiased MMD,
  polynomial kernel) and FD (Fréchet distance) of each generated set to real training patches,
  both computed by torchmetrics on the features of ONE fixed feature extractor: a torchvision
  ResNet-18 with random weights drawn from seed 0, pooled after its second stage. No pretrained
  weights exist offline, so these are NOT Inception FID/KID: compare them between rows of one
  table only. With a few dozen images FD is biased upwards; KID is unbiased.

    python benchmarks/sampler_agreement.py                      # the demo checkpoint, 16 pairs (CPU: ~25 min)
    python benchmarks/sampler_agreement.py --checkpoint results/checkpoints/RUN/last.ckpt \\
        --overrides data=glas preset=paper --pairs 64
    python benchmarks/sampler_agreement.py --candidates dpm_solver:8 dpm_solver:8:trailing
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import harness as H
from stedm.metrics.features import distances, feature_extractor  # the one offline extractor and KID

ROOT = Path(__file__).resolve().parents[1]
CFG_SCALE = 1.5
DEMO_OVERRIDES = ("preset=tiny", "location.result_dir=results/demo", "location.data_dir=results/demo/data")
DEMO_CHECKPOINT = ROOT / "results/demo/checkpoints/demo-demo_anno-augmented-mean-tiny-k4-seed0/last.ckpt"
DEFAULT_CANDIDATES = ("dpm_solver:6", "dpm_solver:8", "dpm_solver:10", "dpm_solver:15", "dpm_solver:20",
                      "dpm_solver:10:linspace")


@dataclass(frozen=True)
class Candidate:
    sampler: str
    steps: int
    spacing: str | None = None

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """``sampler:steps[:spacing]``, e.g. ``dpm_solver:8`` or ``dpm_solver:10:linspace``."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"candidate {text!r}: write sampler:steps[:spacing], e.g. dpm_solver:8 or dpm_solver:10:linspace")
        return cls(parts[0], int(parts[1]), parts[2] if len(parts) == 3 else None)

    @property
    def label(self) -> str:
        spacing = self.spacing or {"ddim": "paper spacing"}.get(self.sampler, "logsnr spacing")
        return f"{self.sampler} {self.steps} ({spacing})"


PAPER_DDIM = Candidate("ddim", 128)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-20))


def compose_predict(overrides: tuple[str, ...]):
    from hydra import compose, initialize_config_dir

    import stedm  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("predict_diff", overrides=list(overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--overrides", nargs="*", default=list(DEMO_OVERRIDES),
                        help="Hydra overrides of predict_diff.yaml choosing the data (layouts and styles)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--converged", default="dpm_solver:50",
                        help="the nearly exact ODE solution every row is also compared with")
    parser.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES),
                        help="sampler:steps[:spacing] (samplers: dpm_solver, ddim)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.checkpoint.is_file():
        sys.exit(f"--checkpoint {args.checkpoint} does not exist: run `make demo` (it trains the demo model) or "
                 "pass a train_diff.py checkpoint")
    candidates = [Candidate.parse(c) for c in args.candidates]

    from stedm.tasks.predict import PairSource, load_model

    model = load_model(args.checkpoint)
    cfg = compose_predict(tuple(args.overrides))
    source = PairSource(cfg, with_style=model.style is not None)
    inputs = [source(i) for i in range(args.pairs)]
    masks = torch.stack([x["mask"] for x in inputs])
    styles = torch.stack([x["style"] for x in inputs]) if model.style is not None else None
    real = torch.stack([source.layouts[i % len(source.layouts)]["image"] for i in range(args.pairs)])

    def run(candidate: Candidate, batched: bool) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        images = model.generate(masks, styles, seed=args.seed, solver=candidate.sampler, steps=candidate.steps,
                                spacing=candidate.spacing, cfg_scale=CFG_SCALE,
                                batched_guidance=batched)
        return images, time.perf_counter() - start

    print(f"# Sampler agreement with the paper's DDIM\n\ncheckpoint {args.checkpoint}, {args.pairs} pairs of "
          f"{masks.shape[-1]} px, seed {args.seed}, cfg_scale {CFG_SCALE}; data: {' '.join(args.overrides)}\n"
          "features: torchvision ResNet-18, random weights from seed 0, pooled after stage 2 (NOT Inception: "
          "compare within this table only)\n", flush=True)
    reference, seconds = run(PAPER_DDIM, batched=False)
    converged, _ = run(Candidate.parse(args.converged), batched=True)
    extractor = feature_extractor()
    subset = min(args.pairs, len(real)) // 2
    kid, fd = distances(real, reference, extractor, subset)
    rows = [[PAPER_DDIM.label + ", two-pass guidance", 143, "—", "—", f"{psnr(reference, converged).mean():.2f}",
             f"{kid:.2f}", f"{fd:.3f}", f"{seconds:.1f}"]]
    for candidate in candidates:
        images, seconds = run(candidate, batched=True)
        agreement = psnr(images, reference)
        kid, fd = distances(real, images, extractor, subset)
        rows.append([candidate.label, candidate.steps, f"{agreement.mean():.2f}", f"{agreement.min():.2f}",
                     f"{psnr(images, converged).mean():.2f}", f"{kid:.2f}", f"{fd:.3f}", f"{seconds:.1f}"])
        print(f"  {candidate.label}: PSNR {agreement.mean():.2f} dB", file=sys.stderr, flush=True)
    print(H.markdown_table(["sampler", "model calls", "PSNR to paper DDIM, mean (dB)", "worst pair (dB)",
                            f"PSNR to {args.converged}, mean (dB)", "KID×1e3 to real", "FD to real",
                            f"s for {args.pairs} pairs"], rows))


if __name__ == "__main__":
    main()
