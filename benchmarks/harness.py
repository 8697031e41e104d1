"""Measuring machinery shared by the benchmark scripts: one place for how we time, count and report.

- **Repetitions**: every figure is the median of ``reps`` timed repetitions after ``warmup``
  untimed ones (``--quick`` takes fewer, for smoke runs; never quote quick figures).
- **FLOPs**: counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions,
  attention; element-wise work is not counted), so achieved GFLOP/s is a lower bound of the
  work done and comparable between runs of the same code.
- **Peak**: the matmul throughput (GFLOP/s) measured in the same run, per dtype, is the
  reference the achieved GFLOP/s is set against.
- **bf16**: only where the hardware runs it natively (CUDA with bf16, CPUs with AMX or
  AVX512-BF16; :func:`stedm.run.cpu_has_fast_bf16`). Elsewhere bf16 is emulated and far slower
  than fp32, so its rows are skipped with the reason printed, never assumed.
- **Peak memory**: CUDA: ``torch.cuda.max_memory_allocated`` over the measured block; CPU: the
  highest resident set size seen by a thread polling ``/proc/self/statm`` during the block
  (``getrusage``'s maximum is lifetime-wide, so it cannot separate configurations). Configurations
  that must not share allocator state run in a fresh process (:func:`run_in_fresh_process`).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import platform
import resource
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]
#: ``location.precision`` of each precision name the benchmarks take
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


# -- repetitions -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Repeats:
    """``warmup`` untimed repetitions, then ``reps`` timed ones whose median is reported."""

    warmup: int
    reps: int

    def __post_init__(self) -> None:
        if self.warmup < 1 or self.reps < 1:
            raise ValueError(f"need at least 1 warm-up and 1 timed repetition, got warmup={self.warmup}, "
                             f"reps={self.reps}")


FULL = Repeats(warmup=1, reps=5)
QUICK = Repeats(warmup=1, reps=1)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: device, threads and repetitions."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK.warmup} warm-up + {QUICK.reps} timed repetitions (figures not for quoting)")
    parser.add_argument("--reps", type=int, default=None, help=f"timed repetitions (default {FULL.reps})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed warm-up repetitions (default {FULL.warmup})")


def repeats_from_args(args: argparse.Namespace) -> Repeats:
    base = QUICK if args.quick else FULL
    return Repeats(warmup=base.warmup if args.warmup is None else args.warmup,
                   reps=base.reps if args.reps is None else args.reps)


def configure_torch(device: str, threads: int | None) -> None:
    """Threads for this process; on CUDA the TF32 matmuls the training runs use (``stedm.run.prepare``)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device here; use --device cpu")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")


# -- timing and counting ---------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values: run at least one timed repetition")
    return statistics.median(values)


def synchronize(device: str | torch.device) -> None:
    """Wait for queued device work, so a host clock reading means the work is done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], repeats: Repeats, device: str) -> list[float]:
    """Seconds of each of ``repeats.reps`` calls of ``fn`` made after ``repeats.warmup`` untimed calls."""
    for _ in range(repeats.warmup):
        fn()
    times = []
    for _ in range(repeats.reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def flop_counter() -> FlopCounterMode:
    """A silent FLOP counter; use as a context manager, read ``get_total_flops()``."""
    return FlopCounterMode(display=False)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (forward and, if ``fn`` calls it, backward)."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def gflops_per_s(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9


class StepProbe:
    """Wraps a loop's iterable (e.g. a sampler's ``progress`` hook) and records, at each step
    boundary, the time and (with a live ``counter``) the FLOPs counted so far.

    ``step_times``/``step_flops`` hold one entry per iteration: from the moment the loop takes an
    item to the moment it asks for the next one (or ends), i.e. the loop body.
    """

    def __init__(self, device: str, counter: FlopCounterMode | None = None):
        self.device, self.counter = device, counter
        self.stamps: list[tuple[float, int]] = []

    def _stamp(self) -> None:
        synchronize(self.device)
        self.stamps.append((time.perf_counter(), self.counter.get_total_flops() if self.counter else 0))

    def __call__(self, iterable: Iterable) -> Iterator:
        for item in iterable:
            self._stamp()
            yield item
        self._stamp()

    @property
    def step_times(self) -> list[float]:
        return [b[0] - a[0] for a, b in zip(self.stamps, self.stamps[1:])]

    @property
    def step_flops(self) -> list[int]:
        return [b[1] - a[1] for a, b in zip(self.stamps, self.stamps[1:])]


# -- hardware ------------------------------------------------------------------------------------
def bf16_status(device: str) -> tuple[bool, str]:
    """Whether this hardware runs bf16 natively, and why (printed when bf16 rows are skipped)."""
    if device == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name()} {'supports' if ok else 'lacks'} bf16"
    from stedm.run import cpu_has_fast_bf16

    if cpu_has_fast_bf16():
        return True, "CPU has AMX or AVX512-BF16"
    return False, "CPU lacks AMX and AVX512-BF16 (stedm.run.cpu_has_fast_bf16() is False): bf16 is emulated"


def matmul_peak_gflops(device: str, dtype: torch.dtype, size: int | None = None,
                       repeats: Repeats = Repeats(1, 3)) -> float:
    """Median throughput of a square ``size`` matmul: the practical peak of this device and dtype."""
    size = size or (8192 if device == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = time_call(lambda: a @ b, repeats, device)
    return gflops_per_s(2 * size**3, median(times))


def matmul_peaks(device: str, bf16_native: bool, quick: bool = False) -> dict[str, float]:
    """Matmul peaks (GFLOP/s) per precision label: ``fp32``, and ``bf16`` where bf16 is native.

    Where it is not, ``bf16 probe`` holds a small bf16 matmul's throughput instead (no peak: the
    emulated path is too slow for a full-size one), so the printed reason for skipping bf16 rests
    on a measurement of this machine.
    """
    repeats = Repeats(1, 2 if quick else 3)
    peaks = {"fp32": matmul_peak_gflops(device, torch.float32, repeats=repeats)}
    if bf16_native:
        peaks["bf16"] = matmul_peak_gflops(device, torch.bfloat16, repeats=repeats)
    else:
        peaks["bf16 probe"] = matmul_peak_gflops(device, torch.bfloat16, size=512, repeats=Repeats(1, 1))
    return peaks


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device: str) -> str:
    """Device, threads, torch version and load average; warns when the CPU is oversubscribed."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); torch {torch.__version__}; {load_average()}"
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    line = f"{cpu_name()}, {threads} threads of {cores} cores; torch {torch.__version__}; {load_average()}"
    if threads > 1 and load_1min() + threads > cores:
        # OpenMP threads that wait at every op's barrier for a descheduled sibling make small ops
        # many times slower; single-threaded figures are far less affected.
        line += (f"\nWARNING: the CPU is shared (load {load_1min():.1f} on {cores} cores): multi-threaded figures are "
                 "inflated by OpenMP oversubscription; compare with --threads 1")
    return line


def load_1min() -> float:
    """The 1-minute load average (0 where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def load_average() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


# -- memory --------------------------------------------------------------------------------------
def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``); elsewhere the lifetime maximum."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class PeakMemory:
    """Peak memory over a block: CUDA allocated bytes, or CPU resident set (polled every ``interval`` s).

    ``start()``/``stop()`` (or ``with``); ``peak_mib`` after stopping. On CPU the figure includes
    everything resident in the process (runtime, weights, optimizer state), as the OS sees it.
    """

    device: str
    interval: float = 0.005
    peak_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return "peak alloc (MiB)" if self.device == "cuda" else "peak RSS (MiB)"

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def start(self) -> None:
        if self.device == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats()
            return
        self.peak_bytes = current_rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def stop(self) -> None:
        if self.device == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the project's code paths -------------------------------------------------------------------
def compose(config_name: str, preset: str, overrides: tuple[str, ...] = ()):
    """``conf/<config_name>.yaml`` composed as the entry script would, with ``preset`` and, unless an
    override names another, ``location=local`` (whatever this machine has)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import stedm  # noqa: F401  (registers the config resolvers)

    location = () if any(o.startswith("location=") for o in overrides) else ("location=local",)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name, overrides=[f"preset={preset}", *location, *overrides])


def quiet_libraries() -> None:
    """Keep Lightning's start-up chatter and known warnings out of the tables."""
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def step_timer(device: str, warmup: int):
    """A Lightning callback timing training steps; ``warmup`` untimed steps come first."""
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Times every training step (forward, backward, optimizer, EMA; wall clock and this
        process's CPU time), counts the FLOPs of the first (untimed) one and tracks peak memory over
        the timed ones."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self.flops = 0
            self.memory = PeakMemory(device)
            self._counter = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == 0:
                self._counter = flop_counter()
                self._counter.__enter__()
            if batch_idx == warmup:
                self.memory.start()
            synchronize(device)
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            synchronize(device)
            elapsed, cpu = time.perf_counter() - self._start, time.process_time() - self._cpu_start
            if batch_idx == 0:
                self._counter.__exit__(None, None, None)
                self.flops = self._counter.get_total_flops()
            if batch_idx >= warmup:
                self.times.append(elapsed)
                self.cpu_times.append(cpu)
            if batch_idx == trainer.max_steps - 1:
                self.memory.stop()

    return StepTimer()


# -- processes -----------------------------------------------------------------------------------
def _call_configured(fn: Callable[..., Any], device: str, threads: int | None, kwargs: dict[str, Any]) -> Any:
    configure_torch(device, threads)
    return fn(device=device, **kwargs)


def run_in_fresh_process(fn: Callable[..., Any], device: str, threads: int | None, **kwargs: Any) -> Any:
    """``fn(device=device, **kwargs)`` in a new (spawned) process with the same thread setting.

    ``fn`` must be importable (module level). Its memory figures then belong to it alone.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_call_configured, fn, device, threads, kwargs).result()


# -- reporting -----------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are printed with ``str``."""
    rows = [[str(c) for c in row] for row in rows]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells for {len(headers)} headers")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def spread(times: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``median (min–max)`` of ``times`` × ``scale``: the figure and how noisy it was."""
    return f"{median(times) * scale:.{digits}f} ({min(times) * scale:.{digits}f}–{max(times) * scale:.{digits}f})"


def percent_of_peak(achieved: float, peak: float | None) -> str:
    return f"{100 * achieved / peak:.0f} %" if peak else "n/a"


# -- reference path vs default path (the speed table, README Performance) -------------------------
@dataclass
class Measured:
    """One path's figures: seconds per unit (a step, a pair, a sample) of each timed repetition,
    FLOPs per unit (None where nothing is counted) and peak memory in MiB (None if not measured)."""

    times: list[float]
    flops: float | None = None
    peak_mib: float | None = None
    load: float = 0.0

    @property
    def seconds(self) -> float:
        return median(self.times)


@dataclass
class Comparison:
    """One row of the speed table: the reference path (the original's way) against our default path,
    measured side by side in one run. ``target`` is the speed-up asked for (``memory_target`` the
    largest default/reference memory ratio allowed, None where memory is not a target)."""

    what: str
    unit: str  # "step", "pair", "sample"
    default_label: str
    reference: Measured
    default: Measured
    target: float
    memory_target: float | None = None
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.reference.seconds / self.default.seconds

    @property
    def memory_ratio(self) -> float | None:
        if self.reference.peak_mib and self.default.peak_mib:
            return self.default.peak_mib / self.reference.peak_mib
        return None


def _seconds(value: float) -> str:
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _throughput(m: Measured, peak: float | None) -> str:
    if not m.flops:
        return "n/a"
    achieved = gflops_per_s(m.flops, m.seconds)
    return f"{achieved:.1f} ({percent_of_peak(achieved, peak)})"


def comparison_table(comparisons: Sequence[Comparison], fp32_peak: float | None, memory_label: str) -> str:
    """Markdown table of ``comparisons``: times per unit, speed-up against its target, achieved
    GFLOP/s (and its share of the fp32 matmul peak ``fp32_peak``), peak memory and its ratio."""
    rows = []
    for c in comparisons:
        met = "yes" if c.speedup >= c.target else "**no**"
        ratio = c.memory_ratio
        memory = "n/a" if ratio is None else f"{ratio:.2f}" + (
            "" if c.memory_target is None else (" (ok)" if ratio <= c.memory_target else " (**over**)"))
        rows.append([c.what + (f" ({c.note})" if c.note else ""), c.default_label,
                     f"{_seconds(c.reference.seconds)} / {c.unit}", f"{_seconds(c.default.seconds)} / {c.unit}",
                     f"{c.speedup:.2f}×", f"≥ {c.target:g}× {met}", _throughput(c.reference, fp32_peak),
                     _throughput(c.default, fp32_peak),
                     "n/a" if c.reference.peak_mib is None else f"{c.reference.peak_mib:.0f}",
                     "n/a" if c.default.peak_mib is None else f"{c.default.peak_mib:.0f}", memory,
                     f"{c.reference.load:.1f} / {c.default.load:.1f}"])
    headers = ["what", "default path", "reference", "default", "speed-up", "target",
               "reference GFLOP/s (of peak)", "default GFLOP/s (of peak)", f"reference {memory_label}",
               f"default {memory_label}", "memory ratio", "load"]
    return markdown_table(headers, rows)
