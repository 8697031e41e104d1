"""GenSelfDiff-HIS pretraining: the cost of one step of ``pretrain_ssl.py``, on its real code path.

A step is what ``pretrain_ssl.py`` runs per batch: the P2-weighted diffusion loss (noising, U-Net
forward), backward, the optimizer step and the EMA update. The module is built from the real
config (``conf/pretrain_ssl.yaml`` composed with ``preset=paper|tiny`` and ``location=local``, as
``stedm.tasks.ssl.pretrain`` instantiates it) and driven by a Lightning ``Trainer`` with the
location's precision (and ``location.compile``), so ``configure_optimizers``, ``training_step`` and
the module's ``optimizer_step`` with its EMA update all run as in training. Timed from
``on_train_batch_start`` to ``on_train_batch_end`` (the timer of ``diffusion.py``); the first step
is untimed and FLOP-counted; peak memory is taken over the timed steps, each configuration in a
fresh process. The sample grid is disabled (``sample_every_n_epochs=0``): it is not part of a step.

**--compare** (the speed table's row, README Performance) — the reference path, the original's way (:data:`REFERENCE_OVERRIDES`:
fp32, torch's default for-loop Adam, the materialised softmax attention, a per-parameter EMA
loop, no compile) against the default path (whatever ``conf/`` makes the
default with ``location=local``) on the paper's network, batch 8 at 64 x 64 px. The two paths
run in alternating fresh processes (``--rounds`` each), so a change of machine load hits both;
their times are pooled.

Without --compare: the default path for each preset, fp32 and bf16 (bf16 only where the hardware
runs it natively; see ``harness.py``).

    python benchmarks/ssl_pretrain.py --compare --threads 1          # the speed table's row
    python benchmarks/ssl_pretrain.py --threads 1                    # default path, paper + tiny
    python benchmarks/ssl_pretrain.py --quick --presets tiny --size 32
    python benchmarks/ssl_pretrain.py --compare --override location.compile=true   # try another default
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

import torch

from benchmarks import harness as H

#: The original's way of computing a pretraining step (what it computes is the same).
REFERENCE_OVERRIDES = ("location.precision=32-true", "location.compile=false", "location.channels_last=false",
                       "model.optimizer.fused=null", "model.attention=explicit", "model.ema_foreach=false")
#: The speed table's setting: the paper's network, batch 8, 64 x 64 px.
COMPARE_PRESET, COMPARE_BATCH, COMPARE_SIZE = "paper", 8, 64


def build_module(preset: str, overrides: tuple[str, ...] = ()):
    """``(SSLPretrainer, cfg)`` exactly as ``pretrain_ssl.py`` builds them (sample grid disabled)."""
    from hydra.utils import instantiate

    from stedm.run import batch_size, learning_rate

    cfg = H.compose("pretrain_ssl", preset, ("model.sample_every_n_epochs=0", *overrides))
    torch.manual_seed(0)
    return instantiate(cfg.model, lr=learning_rate(cfg, batch_size(cfg), 1)), cfg


def path_label(module, optimizer: torch.optim.Optimizer, precision: str, compiled: bool) -> str:
    """What a path does, as the tables name it: precision, Adam variant, attention, EMA."""
    adam = "fused" if optimizer.defaults.get("fused") else "foreach" if optimizer.defaults.get("foreach") else "default"
    hp = module.hparams
    return ", ".join([precision, f"{adam} Adam", f"{hp.attention} attention", "foreach EMA" if hp.ema_foreach else "loop EMA"]
                     + (["channels-last"] if module.channels_last else []) + (["compiled"] if compiled else []))


def measure_steps(device: str, preset: str, batch: int, size: int, repeats: H.Repeats,
                  overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """``repeats.warmup + repeats.reps`` real pretraining steps; times, FLOPs of one step, peak memory."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from stedm.run import apply_channels_last, maybe_compile, resolve_precision

    H.quiet_libraries()
    module, cfg = build_module(preset, overrides)
    precision = resolve_precision(cfg.location)
    module = apply_channels_last(cfg, module, precision)
    # The FLOP-counted step 0 is a warm-up step, except for a compiled module: that compiles again
    # once the counter's dispatch mode is gone, so it gets one more.
    warmup = repeats.warmup + (1 if cfg.location.compile else 0)
    steps = warmup + repeats.reps
    generator = torch.Generator().manual_seed(0)
    batches = [{"image": torch.rand(batch, 3, size, size, generator=generator) * 2 - 1} for _ in range(steps)]
    timer = H.step_timer(device, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                             max_epochs=1, max_steps=steps, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, default_root_dir=tmp, callbacks=[timer])
        trainer.fit(maybe_compile(cfg, module), train_dataloaders=DataLoader(batches, batch_size=None))
    loss = float(trainer.callback_metrics["train/loss"])
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"{preset} {overrides}: the pretraining loss is {loss}")
    label = "bf16" if precision.startswith("bf16") else "fp32"
    return {"label": path_label(module, trainer.optimizers[0], label, bool(cfg.location.compile)),
            "precision": label, "params": sum(p.numel() for p in module.net.parameters()),
            "times": timer.times, "cpu_times": timer.cpu_times, "flops": timer.flops,
            "peak_mib": timer.memory.peak_mib, "loss": loss, "load": H.load_1min()}


# -- the speed table: reference path vs default path ------------------------------------------------
def compare(device: str, threads: int | None, repeats: H.Repeats, quick: bool = False, *,
            preset: str = COMPARE_PRESET, batch: int = COMPARE_BATCH, size: int = COMPARE_SIZE,
            rounds: int | None = None, overrides: tuple[str, ...] = ()) -> list[H.Comparison]:
    """The reference path against the default path (``overrides`` applied to it), each in fresh
    processes taking turns ``rounds`` times (default 2, ``quick`` 1); times pooled, peaks the highest.

    ``preset``/``batch``/``size`` default to the speed table's setting; smaller ones are for smoke tests.
    """
    rounds = rounds or (1 if quick else 2)
    paths = {"reference": REFERENCE_OVERRIDES, "default": tuple(overrides)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for i in range(rounds):
        for name, path_overrides in paths.items():
            print(f"  pretraining step, {name} path, round {i + 1}/{rounds} ...", file=sys.stderr, flush=True)
            runs[name].append(H.run_in_fresh_process(measure_steps, device, threads, preset=preset, batch=batch,
                                                     size=size, repeats=repeats, overrides=path_overrides))

    def measured(results: list[dict[str, Any]]) -> H.Measured:
        return H.Measured(times=[t for r in results for t in r["times"]], flops=results[0]["flops"],
                          peak_mib=max(r["peak_mib"] for r in results), load=max(r["load"] for r in results))

    def cpu_seconds(results: list[dict[str, Any]]) -> float:
        return H.median([t for r in results for t in r["cpu_times"]])

    # This process's CPU time suffers less than the wall clock from other processes on a shared machine.
    cpu_speedup = cpu_seconds(runs["reference"]) / cpu_seconds(runs["default"])
    net = "default" if preset == "paper" else preset
    return [H.Comparison(what=f"GenSelfDiff {net} net: pretraining step, batch {batch}, {size}² px", unit="step",
                         default_label=runs["default"][0]["label"], reference=measured(runs["reference"]),
                         default=measured(runs["default"]), target=2.5, memory_target=1.1,
                         note=f"CPU-time speed-up {cpu_speedup:.2f}×")]


# -- per-preset table ------------------------------------------------------------------------------
HEADERS = ["preset", "params (M)", "path", "step (ms)", "CPU (ms)", "images/s", "GFLOP/step", "GFLOP/s",
           "of matmul peak", "{memory}", "loss", "load"]


def preset_row(preset: str, batch: int, r: dict[str, Any], peaks: dict[str, float]) -> list[Any]:
    seconds = H.median(r["times"])
    achieved = H.gflops_per_s(r["flops"], seconds)
    return [preset, f"{r['params'] / 1e6:.2f}", r["label"], H.spread(r["times"], 1e3, 0),
            f"{1e3 * H.median(r['cpu_times']):.0f}", f"{batch / seconds:.1f}", f"{r['flops'] / 1e9:.1f}",
            f"{achieved:.1f}", H.percent_of_peak(achieved, peaks.get(r["precision"])), f"{r['peak_mib']:.0f}",
            f"{r['loss']:.3f}", f"{r['load']:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true", help="reference path vs default path (the speed table's row)")
    parser.add_argument("--presets", nargs="+", choices=["paper", "tiny"], default=["paper", "tiny"],
                        help="without --compare: the presets of the table")
    parser.add_argument("--precisions", nargs="+", choices=list(H.PRECISIONS), default=list(H.PRECISIONS))
    parser.add_argument("--allow-slow-bf16", action="store_true",
                        help="run bf16 rows even where bf16 is emulated (checks the code path; figures are slow)")
    parser.add_argument("--batch-size", type=int, default=COMPARE_BATCH)
    parser.add_argument("--size", type=int, default=COMPARE_SIZE, help="image height and width (px)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="--compare: alternating fresh processes per path (default 2, --quick 1)")
    parser.add_argument("--override", nargs="*", default=[],
                        help="extra Hydra overrides of pretrain_ssl.yaml (the default path)")
    H.add_common_arguments(parser)
    args = parser.parse_args()
    repeats = H.repeats_from_args(args)
    H.configure_torch(args.device, args.threads)

    bf16_native, reason = H.bf16_status(args.device)
    peaks = H.matmul_peaks(args.device, bf16_native, quick=args.quick)
    memory = H.PeakMemory(args.device).label
    started = time.perf_counter()
    print(f"# GenSelfDiff-HIS pretraining step{' (--quick: smoke figures, not for quoting)' if args.quick else ''}\n")
    print(H.describe_environment(args.device))
    bf16_peak = f"bf16 {peaks['bf16']:.0f}" if bf16_native else f"bf16 {peaks['bf16 probe']:.1f} (512² probe)"
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, {bf16_peak} GFLOP/s; bf16: {reason}")
    if args.compare:
        print(f"\n## Reference path ({' '.join(REFERENCE_OVERRIDES)}) vs default path (conf/ with location=local"
              f"{' ' + ' '.join(args.override) if args.override else ''}); per path median of the timed steps of "
              f"all rounds, {repeats.reps} per round after {repeats.warmup} warm-up\n")
        comparisons = compare(args.device, args.threads, repeats, args.quick, batch=args.batch_size, size=args.size,
                              rounds=args.rounds, overrides=tuple(args.override))
        print(H.comparison_table(comparisons, peaks["fp32"], memory), flush=True)
    else:
        precisions = [p for p in args.precisions if p != "bf16" or bf16_native or args.allow_slow_bf16]
        if len(precisions) < len(args.precisions):
            print("bf16 rows skipped (--allow-slow-bf16 runs them anyway)")
        print(f"\n## Default path, batch {args.batch_size}, {args.size}² px; median (min–max) of {repeats.reps} steps "
              f"after {repeats.warmup} warm-up (the first one FLOP-counted)\n")
        rows = []
        for preset in args.presets:
            for precision in precisions:
                print(f"  pretraining step, {preset} {precision} ...", file=sys.stderr, flush=True)
                overrides = (f"location.precision={H.PRECISIONS[precision]}", *args.override)
                r = H.run_in_fresh_process(measure_steps, args.device, args.threads, preset=preset,
                                           batch=args.batch_size, size=args.size, repeats=repeats, overrides=overrides)
                rows.append(preset_row(preset, args.batch_size, r, peaks))
        print(H.markdown_table([h.format(memory=memory) for h in HEADERS], rows), flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; {H.load_average()}")


if __name__ == "__main__":
    main()
