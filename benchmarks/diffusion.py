"""STEDM diffusion: training-step and synthetic-pair cost, on the project's real code paths.

Models are built from the real configs (``conf/train_diff.yaml`` composed with ``preset=tiny|paper``
and ``location=local``, random weights: cost does not depend on them), and everything measured
goes through the code users run:

**train** — one optimizer step of :class:`~stedm.modules.style_diffusion.StyleDiffusion` driven
by a Lightning ``Trainer`` as ``train_diff.py`` builds it (precision plugin, ``configure_optimizers``,
the module's ``optimizer_step`` with its EMA update; gradient accumulation 1, so every batch is
a step). Timed from ``on_train_batch_start`` to ``on_train_batch_end``: first-stage encoding,
style encoding, denoiser forward, backward, optimizer, EMA. Batch 1 at a 64 x 64 latent by
default (paper: a 256 px image through the vq-f4 first stage; tiny: 64 px in pixel space).
Precisions fp32 / bf16 autocast (``location.precision``), optimizers torch's default AdamW
(foreach on CUDA, for-loop on CPU) / ``fused=True``. Each configuration runs in a fresh process.

**sample** — time per synthetic pair of :meth:`StyleDiffusion.generate` (style encoding of the
real and the null style, sampler loop with style guidance at ``cfg_scale`` 1.5, first-stage
decoding) on the model as ``predict_diff.py`` loads it (EMA weights in place), under the autocast
``predict_diff.py`` uses, at a 32 x 32 latent: the paper's DDIM (128 requested steps = 143 model
calls) with two guidance passes, with one batched pass and with a shared trunk, and DPM-Solver++
with 20 and 10 steps. A configuration whose full run would exceed
``--max-sample-seconds`` (the paper preset on a CPU) is timed on the same ``generate`` path with
few sampler steps: each timed run is extrapolated as ``fixed + calls x its median step time``
(step times from a clock on the sampler's progress hook, fixed = everything else in the call),
marked "extrapolated" in the table; FLOPs are counted the same way. The timed runs go round-robin
over the setups of a preset, so a change in machine load hits all of them alike.

Every row ends with the 1-minute load average when its measurement ended: on a shared machine,
rows measured under different load do not compare (the training table's CPU time, this
process's CPU seconds per step, suffers less from other processes than the wall clock).

**--compare** — the reference path (the original's way: fp32, default AdamW, no compile, two
guidance passes, DDIM-143) against the default path (whatever ``conf/`` makes the default:
``location=local`` precision/compile, the configured optimizer, ``predict_diff.yaml``'s sampler),
side by side in one run, with the speed-up and memory ratios.

    python benchmarks/diffusion.py                              # train + sample, tiny + paper
    python benchmarks/diffusion.py --quick --presets tiny       # smoke run
    python benchmarks/diffusion.py --part sample --presets paper --device cuda
    python benchmarks/diffusion.py --compare --presets paper
    python benchmarks/diffusion.py --compare --predict-override sampler=dpm_solver steps=20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import harness as H

CFG_SCALE = 1.5
#: AdamW keyword arguments per optimizer variant (None = torch's default choice).
OPTIMIZERS = {"default": {"fused": None, "foreach": None}, "foreach": {"fused": None, "foreach": True},
              "fused": {"fused": True, "foreach": None}}


# -- building blocks: configs, model, inputs -------------------------------------------------------
def build_module(preset: str, overrides: tuple[str, ...] = ()):
    """``(StyleDiffusion, cfg)`` exactly as ``train_diff.py`` builds them (sample grid disabled)."""
    from stedm.run import batch_size, learning_rate
    from stedm.tasks.diffusion import build_model, model_config

    cfg = H.compose("train_diff", preset, ("diffusion.sample_every_n_steps=0", "diffusion.first_stage.allow_random=true",
                                           *overrides))
    torch.manual_seed(0)
    return build_model(model_config(cfg), learning_rate(cfg, batch_size(cfg), 1)), cfg


def synthetic_inputs(module, cfg, batch: int, latent_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch in the data contract's form: image and style images in [-1, 1], a disc-shaped layout."""
    size = latent_size * module.first_stage.downsample_factor
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 4) ** 2).long()
    inputs = {"image": torch.rand(batch, 3, size, size, generator=generator) * 2 - 1,
              "mask": disc.expand(batch, -1, -1).clone()}
    if module.style is not None:
        n = int(cfg.style_sampling.num_images)
        inputs["style"] = torch.rand(batch, n, 3, size, size, generator=generator) * 2 - 1
    return inputs


def precision_override(precision: str | None) -> tuple[str, ...]:
    return () if precision is None else (f"location.precision={H.PRECISIONS[precision]}",)


def optimizer_overrides(optimizer: str | None) -> tuple[str, ...]:
    if optimizer is None:
        return ()
    return tuple(f"++model.optimizer.{key}={'null' if value is None else str(value).lower()}"
                 for key, value in OPTIMIZERS[optimizer].items())


def optimizer_label(optimizer: torch.optim.Optimizer, device: str) -> str:
    """Which AdamW implementation actually ran (torch picks foreach only for CUDA tensors)."""
    if optimizer.defaults.get("fused"):
        return "fused"
    if optimizer.defaults.get("foreach"):
        return "foreach"
    return "default (foreach)" if device == "cuda" else "default (for-loop)"


# -- training --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSetup:
    """One training configuration; ``None`` takes the value from ``conf/`` (the default path)."""

    preset: str
    precision: str | None = None  # fp32 | bf16
    optimizer: str | None = None  # default | foreach | fused
    overrides: tuple[str, ...] = ()

    def hydra_overrides(self) -> tuple[str, ...]:
        return (*precision_override(self.precision), *optimizer_overrides(self.optimizer), *self.overrides)


def reference_train_setup(preset: str) -> TrainSetup:
    """The original's way: fp32, torch's default AdamW, no compile, NCHW activations."""
    return TrainSetup(preset, "fp32", "default", ("location.compile=false", "location.channels_last=false"))


def measure_training(device: str, setup: TrainSetup, batch_size: int, latent_size: int,
                     repeats: H.Repeats) -> dict[str, Any]:
    """``repeats.warmup + repeats.reps`` real training steps; returns times, FLOPs of one step, peak memory."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from stedm.run import apply_channels_last, maybe_compile, resolve_precision

    H.quiet_libraries()
    module, cfg = build_module(setup.preset, setup.hydra_overrides())
    precision = resolve_precision(cfg.location)
    module = apply_channels_last(cfg, module, precision)
    # The FLOP-counted step 0 is a warm-up step, except for a compiled module: that compiles again
    # once the counter's dispatch mode is gone, so it gets one more.
    warmup = repeats.warmup + (1 if cfg.location.compile else 0)
    steps = warmup + repeats.reps
    loader = DataLoader([synthetic_inputs(module, cfg, batch_size, latent_size, seed=i) for i in range(steps)],
                        batch_size=None)
    timer = H.step_timer(device, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                             max_epochs=1, max_steps=steps, accumulate_grad_batches=1,
                             gradient_clip_val=cfg.trainer.gradient_clip_val, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp, callbacks=[timer])
        trainer.fit(maybe_compile(cfg, module), train_dataloaders=loader)
    loss = float(trainer.callback_metrics["train/loss"])
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"{setup}: the training loss is {loss}")
    return {"precision": "bf16" if precision.startswith("bf16") else "fp32",
            "optimizer": optimizer_label(trainer.optimizers[0], device), "compile": cfg.location.compile,
            "channels_last": module.channels_last,
            "params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "image_size": latent_size * module.first_stage.downsample_factor,
            "times": timer.times, "cpu_times": timer.cpu_times, "flops": timer.flops,
            "peak_mib": timer.memory.peak_mib, "loss": loss, "load": H.load_1min()}


# -- sampling --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleSetup:
    """One way of generating a pair: sampler, requested steps, spacing, guidance passes, precision."""

    sampler: str
    steps: int
    spacing: str | None
    batched: bool
    precision: str  # fp32 | bf16
    shared_trunk: bool = False

    @property
    def label(self) -> str:
        spacing = self.spacing or ("paper spacing" if self.sampler == "ddim" else None)
        return f"{self.sampler} {self.steps}" + (f" ({spacing})" if spacing else "")

    @property
    def guidance(self) -> str:
        if not self.batched:
            return "two-pass"
        return "batched, shared trunk" if self.shared_trunk else "batched"


def reference_sample_setup() -> SampleSetup:
    """The paper's sampler: DDIM, 128 requested steps (143 calls), two guidance passes, fp32."""
    return SampleSetup("ddim", 128, None, batched=False, precision="fp32")


def default_sample_setup(preset: str, overrides: tuple[str, ...] = ()) -> SampleSetup:
    """What ``predict_diff.py`` does by default with ``location=local`` on this machine."""
    from stedm.diffusion.options import run_options
    from stedm.run import resolve_precision

    cfg = H.compose("predict_diff", preset, overrides)
    bf16 = resolve_precision(cfg.location).startswith("bf16")
    options = run_options(cfg)
    return SampleSetup(options.solver, options.steps, options.spacing, options.batched_guidance,
                       "bf16" if bf16 else "fp32", options.batched_guidance and options.shared_trunk)


def sample_setups(precisions: list[str]) -> list[SampleSetup]:
    """Paper DDIM with two guidance passes, one batched pass, and one with a shared trunk;
    DPM-Solver++ 20 and 10 steps with a shared trunk."""
    grid = (("ddim", 128, False, False), ("ddim", 128, True, False), ("ddim", 128, True, True),
            ("dpm_solver", 20, True, True), ("dpm_solver", 10, True, True))
    return [SampleSetup(sampler, steps, None, batched, precision, shared_trunk=shared) for precision in precisions
            for sampler, steps, batched, shared in grid]


def model_calls(module, sampler: str, steps: int, spacing: str | None) -> int:
    """Network calls ``sampler`` makes for ``steps`` requested steps: the real sampling loop with a
    stand-in network that only counts."""
    from stedm.diffusion.solvers import sample

    calls = 0

    def count(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return torch.zeros_like(x)

    sample(count, torch.zeros(1, module.first_stage.latent_channels, 8, 8), module.noise_scheduler, sampler,
           steps, spacing)
    return calls


def _generate(module, inputs: dict[str, torch.Tensor], setup: SampleSetup, steps: int, device: str,
              progress=None) -> torch.Tensor:
    """``generate`` as ``predict_diff.py`` calls it (autocast when bf16)."""
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=setup.precision == "bf16"):
        return module.generate(inputs["mask"], inputs.get("style"), solver=setup.sampler, steps=steps,
                               spacing=setup.spacing, cfg_scale=CFG_SCALE,
                               batched_guidance=setup.batched, shared_trunk=setup.shared_trunk, progress=progress)


class SamplerTiming:
    """Times one sampling setup on the real ``generate`` path (the whole batch per call).

    :meth:`prepare` makes one run with ``probe_steps`` requested steps under the FLOP counter, then
    ``warmup`` runs at ``probe_steps`` with a clock on the sampler's steps. If the last one predicts
    the full run to take at most ``max_seconds``, every :meth:`timed_run` is a full, unprobed
    ``generate`` call; otherwise it stays at ``probe_steps`` and is extrapolated as
    fixed + calls x its median step time (fixed: everything in the call outside the sampler steps).
    Callers interleave the timed runs of several setups, so a change in machine load hits all alike.
    """

    def __init__(self, module, inputs: dict[str, torch.Tensor], setup: SampleSetup, device: str,
                 max_seconds: float, probe_steps: int):
        self.module, self.inputs, self.setup, self.device = module, inputs, setup, device
        self.max_seconds = max_seconds
        self.full_calls = model_calls(module, setup.sampler, setup.steps, setup.spacing)
        self.probe_steps = min(probe_steps, setup.steps)
        self.extrapolate = False
        self.flops = 0.0
        self.times: list[float] = []
        self.step_times: list[float] = []  # of the timed runs if extrapolated, else of the last warm-up
        self.measured_calls = 0
        self.peak_bytes = 0

    def _run(self, steps: int, progress: H.StepProbe | None = None) -> float:
        H.synchronize(self.device)
        start = time.perf_counter()
        images = _generate(self.module, self.inputs, self.setup, steps, self.device, progress)
        H.synchronize(self.device)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(images).all():
            raise FloatingPointError(f"{self.setup}: generate() returned non-finite values")
        return elapsed

    def _probed_run(self) -> tuple[float, list[float]]:
        """(fixed seconds, seconds of each sampler step) of a run with ``probe_steps``."""
        probe = H.StepProbe(self.device)
        total = self._run(self.probe_steps, probe)
        self.measured_calls = len(probe.step_times)
        return total - sum(probe.step_times), probe.step_times

    def prepare(self, warmup: int) -> None:
        with H.flop_counter() as counter:
            probe = H.StepProbe(self.device, counter)
            self._run(self.probe_steps, probe)
        step_flops = probe.step_flops
        self.flops = counter.get_total_flops() - sum(step_flops) + self.full_calls * H.median(step_flops)
        for _ in range(warmup):
            fixed, self.step_times = self._probed_run()
        predicted = fixed + self.full_calls * H.median(self.step_times)
        self.extrapolate = self.measured_calls < self.full_calls and predicted > self.max_seconds

    def timed_run(self) -> None:
        with H.PeakMemory(self.device) as memory:
            if self.extrapolate:
                fixed, steps = self._probed_run()
                self.step_times = steps if not self.times else self.step_times + steps
                self.times.append(fixed + self.full_calls * H.median(steps))
            else:
                self.times.append(self._run(self.setup.steps))
        self.peak_bytes = max(self.peak_bytes, memory.peak_bytes)

    def result(self) -> dict[str, Any]:
        return {"calls": self.full_calls, "measured_calls": self.measured_calls, "extrapolated": self.extrapolate,
                "times": self.times, "step_s": H.median(self.step_times), "flops": self.flops,
                "peak_mib": self.peak_bytes / H.MIB}


def measure_sampling(device: str, preset: str, setups: list[SampleSetup], batch_size: int, latent_size: int,
                     repeats: H.Repeats, max_seconds: float, probe_steps: int,
                     overrides: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every ``setup`` on one model of ``preset`` (built once, moved to ``device``, eval mode); the
    timed runs go round-robin over the setups.

    Results are plain dicts in the order of ``setups`` (classes of a spawned ``__main__`` do not
    unpickle in the parent), so the caller pairs them with its setups."""
    H.quiet_libraries()
    module, cfg = build_module(preset, overrides)
    module = module.bake_ema().to(device).eval()  # as predict_diff.py loads it: EMA weights in place
    inputs = synthetic_inputs(module, cfg, batch_size, latent_size)
    timings = [SamplerTiming(module, inputs, setup, device, max_seconds, probe_steps) for setup in setups]
    for timing in timings:
        print(f"  sampling {preset} {timing.setup}: warm-up ...", file=sys.stderr, flush=True)
        timing.prepare(repeats.warmup)
    for i in range(repeats.reps):
        print(f"  sampling {preset}: round {i + 1}/{repeats.reps} over {len(timings)} setups ...", file=sys.stderr,
              flush=True)
        for timing in timings:
            timing.timed_run()
    image_size = latent_size * module.first_stage.downsample_factor
    return [{"preset": preset, "batch": batch_size, "image_size": image_size, "load": H.load_1min(), **t.result()}
            for t in timings]


# -- tables ----------------------------------------------------------------------------------------
def train_row(r: dict[str, Any], peaks: dict[str, float]) -> list[Any]:
    achieved = H.gflops_per_s(r["flops"], H.median(r["times"]))
    return [r["setup"].preset, r["image_size"], f"{r['params'] / 1e6:.1f}", r["precision"], r["optimizer"],
            H.spread(r["times"], 1e3, 0), f"{1e3 * H.median(r['cpu_times']):.0f}", f"{r['flops'] / 1e9:.1f}",
            f"{achieved:.1f}", H.percent_of_peak(achieved, peaks.get(r["precision"])), f"{r['peak_mib']:.0f}",
            f"{r['loss']:.3f}", f"{r['load']:.1f}"]


TRAIN_HEADERS = ["preset", "image (px)", "trainable params (M)", "precision", "AdamW", "step (ms)", "CPU (ms)",
                 "GFLOP/step", "GFLOP/s", "of matmul peak", "{memory}", "loss", "load"]


def sample_row(r: dict[str, Any], peaks: dict[str, float]) -> list[Any]:
    setup, per_pair = r["setup"], [t / r["batch"] for t in r["times"]]
    achieved = H.gflops_per_s(r["flops"], H.median(r["times"]))
    how = f"extrapolated from {r['measured_calls']} calls" if r["extrapolated"] else "measured"
    return [r["preset"], r["image_size"], setup.precision, setup.label, setup.guidance, r["calls"],
            H.spread(per_pair, 1.0, 3), f"{1e3 * r['step_s']:.1f}", f"{r['flops'] / r['batch'] / 1e9:.1f}",
            f"{achieved:.1f}", H.percent_of_peak(achieved, peaks.get(setup.precision)), f"{r['peak_mib']:.0f}",
            how, f"{r['load']:.1f}"]


SAMPLE_HEADERS = ["preset", "image (px)", "precision", "sampler (requested steps)", "guidance", "model calls",
                  "s / pair", "ms / call", "GFLOP / pair", "GFLOP/s", "of matmul peak", "{memory}", "how", "load"]


def train_in_fresh_process(args, setup: TrainSetup, repeats: H.Repeats) -> dict[str, Any]:
    print(f"  training {setup} ...", file=sys.stderr, flush=True)
    result = H.run_in_fresh_process(measure_training, args.device, args.threads, setup=setup,
                                    batch_size=args.train_batch, latent_size=args.train_latent, repeats=repeats)
    return {"setup": setup, **result}


def sample_in_fresh_process(args, preset: str, setups: list[SampleSetup], repeats: H.Repeats) -> list[dict[str, Any]]:
    results = H.run_in_fresh_process(measure_sampling, args.device, args.threads, preset=preset, setups=setups,
                                     batch_size=args.sample_batch, latent_size=args.sample_latent, repeats=repeats,
                                     max_seconds=args.max_sample_seconds, probe_steps=args.probe_steps,
                                     overrides=tuple(args.override))
    return [{"setup": setup, **result} for setup, result in zip(setups, results, strict=True)]


def run_training(args, repeats: H.Repeats, precisions: list[str], peaks: dict[str, float], memory: str) -> None:
    print(f"\n## Training step: batch {args.train_batch}, {args.train_latent}x{args.train_latent} latent; "
          f"median (min–max) of {repeats.reps} steps after {repeats.warmup} warm-up (the first one FLOP-counted)\n")
    rows = [train_row(train_in_fresh_process(args, TrainSetup(preset, precision, optimizer, tuple(args.override)),
                                             repeats), peaks)
            for preset in args.presets for precision in precisions for optimizer in args.optimizers]
    print(H.markdown_table([h.format(memory=memory) for h in TRAIN_HEADERS], rows), flush=True)


def run_sampling(args, repeats: H.Repeats, precisions: list[str], peaks: dict[str, float], memory: str) -> None:
    print(f"\n## Synthetic pair: batch {args.sample_batch}, {args.sample_latent}x{args.sample_latent} latent, "
          f"cfg_scale {CFG_SCALE}; median (min–max) of {repeats.reps} generate() calls after {repeats.warmup} "
          f"warm-up; runs predicted longer than {args.max_sample_seconds:g} s are extrapolated from "
          f"{args.probe_steps} requested steps\n")
    rows = [sample_row(r, peaks) for preset in args.presets
            for r in sample_in_fresh_process(args, preset, sample_setups(precisions), repeats)]
    print(H.markdown_table([h.format(memory=memory) for h in SAMPLE_HEADERS], rows), flush=True)


def comparisons(args, repeats: H.Repeats) -> list[H.Comparison]:
    """Reference path vs default path for each of ``args.presets``: the speed table's training-step
    row (README, Performance; target 4x, memory at most 1.1x) and synthetic-pair row (target 25x)."""
    rows = []
    for preset in args.presets:
        if args.part in ("train", "all"):
            ref = train_in_fresh_process(args, reference_train_setup(preset), repeats)
            new = train_in_fresh_process(args, TrainSetup(preset, overrides=tuple(args.override)), repeats)
            rows.append(H.Comparison(
                f"STEDM {preset} preset: training step, batch {args.train_batch}, {args.train_latent}² latent", "step",
                f"{new['precision']}, {new['optimizer']} AdamW, compile {new['compile']}"
                f"{', channels-last' if new['channels_last'] else ''}", _measured(ref, 1),
                _measured(new, 1), target=4.0, memory_target=1.1))
        if args.part in ("sample", "all"):
            new_setup = default_sample_setup(preset, tuple(args.predict_override))
            ref, new = sample_in_fresh_process(args, preset, [reference_sample_setup(), new_setup], repeats)
            extrapolated = [f"{r['setup'].label}: extrapolated from {r['measured_calls']} of {r['calls']} calls"
                            for r in (ref, new) if r["extrapolated"]]
            rows.append(H.Comparison(
                f"STEDM {preset} preset: one synthetic pair, cfg_scale {CFG_SCALE:g}, {args.sample_latent}² latent",
                "pair", f"{new_setup.precision}, {new_setup.label} = {new['calls']} calls, {new_setup.guidance}",
                _measured(ref, args.sample_batch), _measured(new, args.sample_batch), target=25.0,
                note="; ".join(extrapolated)))
    return rows


def _measured(result: dict[str, Any], per: int) -> H.Measured:
    return H.Measured([t / per for t in result["times"]], result["flops"] / per, result["peak_mib"], result["load"])


def run_compare(args, repeats: H.Repeats, peaks: dict[str, float], memory: str) -> None:
    print("\n## Reference path (fp32, default AdamW, no compile, two-pass guidance, DDIM-143) vs default path "
          f"(conf/ with location=local); median of {repeats.reps} after {repeats.warmup} warm-up\n")
    print(H.comparison_table(comparisons(args, repeats), peaks.get("fp32"), memory), flush=True)


def compare(device: str, threads: int | None, repeats: H.Repeats, quick: bool = False,
            argv: tuple[str, ...] = ("--presets", "paper")) -> list[H.Comparison]:
    """The STEDM rows of the speed table (``benchmarks/speed.py``); ``argv``: more options of this script."""
    args = parse_arguments(["--device", device, *(["--threads", str(threads)] if threads else []),
                            *(["--quick"] if quick else []), *argv])
    return comparisons(args, repeats)


# -- main ------------------------------------------------------------------------------------------
def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["train", "sample", "all"], default="all")
    parser.add_argument("--presets", nargs="+", choices=["tiny", "paper"], default=["tiny", "paper"])
    parser.add_argument("--precisions", nargs="+", choices=list(H.PRECISIONS), default=list(H.PRECISIONS))
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=["default", "fused"])
    parser.add_argument("--compare", action="store_true", help="reference path vs default path, with ratios")
    parser.add_argument("--allow-slow-bf16", action="store_true",
                        help="run bf16 rows even where bf16 is emulated (checks the code path; figures are slow)")
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--train-latent", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=1, help="pairs per generate() call")
    parser.add_argument("--sample-latent", type=int, default=32)
    parser.add_argument("--max-sample-seconds", type=float, default=None,
                        help="extrapolate sampler runs predicted to take longer (default 30, --quick 10)")
    parser.add_argument("--probe-steps", type=int, default=None,
                        help="requested steps of extrapolated runs (default 4, --quick 1)")
    parser.add_argument("--override", nargs="*", default=[],
                        help="extra Hydra overrides of train_diff.yaml (the model; in --compare the default path)")
    parser.add_argument("--predict-override", nargs="*", default=[],
                        help="extra Hydra overrides of predict_diff.yaml (the default sampling path of --compare)")
    H.add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.max_sample_seconds = args.max_sample_seconds or (10.0 if args.quick else 30.0)
    args.probe_steps = args.probe_steps or (1 if args.quick else 4)
    return args


def main() -> None:
    args = parse_arguments()
    repeats = H.repeats_from_args(args)
    H.configure_torch(args.device, args.threads)

    bf16_native, reason = H.bf16_status(args.device)
    peaks = H.matmul_peaks(args.device, bf16_native, quick=args.quick)
    precisions = [p for p in args.precisions if p != "bf16" or bf16_native or args.allow_slow_bf16]
    memory = H.PeakMemory(args.device).label
    started = time.perf_counter()
    print(f"# STEDM diffusion benchmark{' (--quick: smoke figures, not for quoting)' if args.quick else ''}\n")
    print(f"{H.describe_environment(args.device)}")
    bf16_peak = f"bf16 {peaks['bf16']:.0f}" if bf16_native else f"bf16 {peaks['bf16 probe']:.1f} (512² probe)"
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, {bf16_peak} GFLOP/s; bf16: {reason}")
    if "bf16" in args.precisions and not bf16_native:
        print("bf16 rows run on emulated bf16 (--allow-slow-bf16): code-path check, not performance"
              if args.allow_slow_bf16 else "bf16 rows skipped (--allow-slow-bf16 runs them anyway)")
    if args.compare:
        run_compare(args, repeats, peaks, memory)
    else:
        if args.part in ("train", "all"):
            run_training(args, repeats, precisions, peaks, memory)
        if args.part in ("sample", "all"):
            run_sampling(args, repeats, precisions, peaks, memory)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; {H.load_average()}")


if __name__ == "__main__":
    main()
