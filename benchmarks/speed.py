"""The speed table (README, Performance) in one run: the reference path (the original's way) against
our default path.

Rows (each measured side by side in this run, medians of >= 5 repetitions after warm-up):

- STEDM paper preset, one training step (forward, backward, optimizer, EMA), batch 1, 64² latent:
  ``benchmarks/diffusion.py`` (reference: fp32, torch's default AdamW, no compile).
- STEDM paper preset, one synthetic pair at cfg_scale 1.5, 32² latent: ``benchmarks/diffusion.py``
  (reference: DDIM with the paper's spacing = 143 calls, two guidance passes, fp32).
- GenSelfDiff default net, one pretraining step, batch 8, 64² px: ``benchmarks/ssl_pretrain.py``.
- WSI training samples per worker with ``mp`` style sampling, 512 px JPEG tiled TIFF:
  ``benchmarks/wsi.py``.

Achieved GFLOP/s (FLOPs counted by ``torch.utils.flop_counter``) is set against the fp32 matmul
peak measured at the start of this run; memory is each path's peak (CPU: resident set size of
its own process). Sampling quality of the fast sampler is a separate table:
``benchmarks/sampler_agreement.py``.

    python benchmarks/speed.py --threads 2          # the whole table (~10 min on 2 idle CPU cores)
    python benchmarks/speed.py --quick --threads 1  # smoke run, figures not for quoting
    python benchmarks/speed.py --only ssl wsi
"""

from __future__ import annotations

import argparse
import time

from benchmarks import diffusion, ssl_pretrain, wsi
from benchmarks import harness as H

PARTS = {
    "train_diff": lambda *a, **k: diffusion.compare(*a, **k, argv=("--presets", "paper", "--part", "train")),
    "predict_diff": lambda *a, **k: diffusion.compare(*a, **k, argv=("--presets", "paper", "--part", "sample")),
    "ssl": ssl_pretrain.compare,
    "wsi": wsi.compare,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS))
    H.add_common_arguments(parser)
    args = parser.parse_args()
    repeats = H.repeats_from_args(args)
    H.configure_torch(args.device, args.threads)
    started = time.perf_counter()
    print(f"# Reference path vs default path{' (--quick: smoke figures, not for quoting)' if args.quick else ''}\n")
    print(H.describe_environment(args.device))
    bf16_native, reason = H.bf16_status(args.device)
    peaks = H.matmul_peaks(args.device, bf16_native, quick=args.quick)
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s; bf16: {reason}\n")
    rows = []
    for part in args.only:
        rows += PARTS[part](args.device, args.threads, repeats, quick=args.quick)
    print(H.comparison_table(rows, peaks["fp32"], H.PeakMemory(args.device).label))
    print(f"\nmedians of {repeats.reps} after {repeats.warmup} warm-up; total {time.perf_counter() - started:.0f} s; "
          f"{H.load_average()}")


if __name__ == "__main__":
    main()
