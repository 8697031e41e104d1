"""Cached latents (``data.cache_latents=true``): step speed-up, agreement and hit rates.

The paper preset (vq-f4 first stage, random but seeded weights: ``diffusion.first_stage.allow_random=true``)
on the demo data, batches drawn by the real cached DataModule (``StedmDataModule`` with
``data.cache_latents=true``, so crops lie on the 4-px latent grid):

- **build**: encoding every training image once per orientation (cold cache: 0 % hits), then
  the same again (warm: 100 % hits, nothing encoded);
- **agreement**: for each sample, the cached latent crop against ``first_stage.encode`` of the
  very patch the denoiser is conditioned on (same crop, same orientation): relative L2 error
  ``|cached - fly| / |fly|``, on the border ring of latent cells and inside;
- **step**: one training step (Trainer, precision and optimizer as configured) fed the same
  batches with and without their ``latent``: the uncached step encodes the images.

    python benchmarks/latent_cache.py                     # batch 2 at 128 px (32² latent)
    python benchmarks/latent_cache.py --batch 8 --patch 256 --device cuda
    python benchmarks/latent_cache.py --quick             # smoke run, figures not for quoting
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import harness as H


def cached_datamodule(cfg, cache_dir: Path, module, device: str):
    from hydra.utils import instantiate

    from stedm.data.datamodule import StedmDataModule
    from stedm.data.latent_cache import attach

    dm = StedmDataModule(cfg.data, batch_size=int(cfg.data.batch_base), eval_splits=(), cache_dir=cache_dir,
                         style_source=instantiate(cfg.style_sampling.source))
    strategy = SimpleNamespace(root_device=torch.device(device), barrier=lambda name=None: None)
    trainer = SimpleNamespace(lightning_module=module, strategy=strategy, global_rank=0, world_size=1)
    dm.trainer = trainer
    cold = attach(dm, trainer)
    dm.latent_store = None
    warm = attach(dm, trainer)
    dm.trainer = None
    return dm, cold, warm


def agreement(module, batches: list[dict], device: str) -> dict[str, float]:
    """Relative L2 error of cached against on-the-fly latents, overall, border ring and inside."""
    errs = {"all": [], "border": [], "inside": []}
    with torch.no_grad():
        for batch in batches:
            fly = module.first_stage.encode(batch["image"].to(device)).float().cpu()
            cached = batch["latent"].float()
            diff = (cached - fly).pow(2).sum(1)
            ref = fly.pow(2).sum(1)
            ring = torch.ones_like(diff, dtype=torch.bool)
            ring[:, 1:-1, 1:-1] = False
            for name, where in (("all", torch.ones_like(ring)), ("border", ring), ("inside", ~ring)):
                errs[name].append(float((diff[where].sum() / ref[where].sum()).sqrt()))
    return {k: sum(v) / len(v) for k, v in errs.items()}


def time_steps(module, cfg, batches: list[dict], device: str, warmup: int) -> dict:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from stedm.run import resolve_precision

    timer = H.step_timer(device, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                             precision=resolve_precision(cfg.location), max_epochs=1, max_steps=len(batches),
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             default_root_dir=tmp, callbacks=[timer])
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return {"times": timer.times, "flops": timer.flops, "load": H.load_1min()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", type=int, default=128, help="data.patch_size (demo regions are 128 px)")
    parser.add_argument("--agreement-batches", type=int, default=8)
    parser.add_argument("--precision", default="32-true", help="location.precision of the timed steps")
    parser.add_argument("--no-steps", action="store_true", help="build and agreement only (no timed steps)")
    args = parser.parse_args(argv)
    repeats = H.repeats_from_args(args)
    H.configure_torch(args.device, args.threads)
    H.quiet_libraries()
    from benchmarks.diffusion import build_module

    print(H.describe_environment(args.device))
    module, cfg = build_module("paper", (f"data.batch_base={args.batch}", f"data.patch_size={args.patch}",
                                         "data.cache_latents=true", f"location.precision={args.precision}",
                                         f"data.samples={max(64, args.batch * 4)}"))
    module.to(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        dm, cold, warm = cached_datamodule(cfg, Path(tmp) / "cache", module, args.device)
        loader = iter(dm.train_dataloader())
        steps = repeats.warmup + repeats.reps
        batches = [next(loader) for _ in range(max(steps, args.agreement_batches))]
    print(f"\ncold build: {cold}\nwarm build: {warm}")
    agree = agreement(module, batches[:args.agreement_batches], args.device)
    print(f"\nagreement over {args.agreement_batches} batches of {args.batch} at {args.patch} px "
          f"({args.patch // 4}² latent): relative L2 error |cached - on the fly| / |on the fly| = "
          f"{agree['all']:.3f} (border ring of latent cells {agree['border']:.3f}, inside {agree['inside']:.3f})")
    if args.no_steps:
        return
    timed = batches[:steps]
    uncached = [{k: v for k, v in b.items() if k != "latent"} for b in timed]
    results = {}
    for name, data in (("on the fly", uncached), ("cached", timed), ("on the fly ", uncached), ("cached ", timed)):
        r = time_steps(module, cfg, data, args.device, repeats.warmup)
        results.setdefault(name.strip(), []).append(r)
    rows, medians = [], {}
    for name, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        medians[name] = H.median(times)
        rows.append([name, f"{H.spread(times)} s", f"{runs[0]['flops'] / 1e9:.0f}",
                     f"{H.gflops_per_s(runs[0]['flops'], medians[name]):.0f}", f"{runs[-1]['load']:.1f}"])
    print(f"\ntraining step, paper preset, batch {args.batch} at {args.patch} px, {args.precision} "
          f"(two alternating runs each, medians of {2 * repeats.reps}):\n")
    print(H.markdown_table(["latents", "step", "GFLOP", "GFLOP/s", "load"], rows))
    print(f"\nspeed-up {medians['on the fly'] / medians['cached']:.2f}x; {H.load_average()}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
