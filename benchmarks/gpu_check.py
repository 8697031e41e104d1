"""One-call GPU check: the five scripts end to end, the paper training step and a synthetic pair.

On one CUDA device, meant to finish within 4 minutes including imports:

1. each of ``train_diff.py``, ``predict_diff.py``, ``train_seg.py``, ``pretrain_ssl.py``,
   ``finetune_ssl.py`` as a subprocess at smoke size (tiny preset, demo data, 32 px patches, a few
   steps) with ``location.precision=bf16-mixed`` and DDP at world size 1
   (``location.strategy=ddp location.backend=nccl location.devices=1``);
2. the bf16 matmul peak of the device, measured in this run;
3. the paper preset training step (batch 8 at 256 px, the paper's per-GPU batch; random first stage
   with the explicit opt-in ``diffusion.first_stage.allow_random=true``) and one synthetic pair
   (``predict_diff.py``'s default sampler), through ``benchmarks/diffusion.py``'s measuring code:
   achieved TFLOP/s against that peak (goal: >= 35 % on the training step) and peak GPU memory.

Writes ``gpu_check.md`` and ``gpu_check.json`` to ``--out``. ``--device cpu --quick`` runs the same
code path on the CPU at toy size (tiny preset, gloo instead of NCCL): what CI runs.

The GPU machine lacks some of our dependencies: ``benchmarks/gpu_wheels.sh`` downloads them as wheels.

    python -m benchmarks.gpu_check                       # on the GPU machine (from the repository root:
                                                         # finds stedm and benchmarks without an install)
    python benchmarks/gpu_check.py --device cpu --quick  # dry run here
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks import harness as H  # noqa: E402

BUDGET_S = 240
GOAL = 0.35
SCRIPT_TIMEOUT_S = 150
#: README Performance, "Settings to time on a GPU": training-step rows beside the default.
#: ``location.compile=true`` is left to ``--settings`` (its compile time would exceed the budget).
SETTINGS = ("location.channels_last=false", "location.channels_last=true", "++model.optimizer.fused=null")


def smoke_overrides(device: str, root: Path) -> list[str]:
    """Tiny preset on the demo data, bf16-mixed, DDP at world size 1."""
    return [f"location.result_dir={root / 'results'}", f"location.data_dir={root / 'data'}", "preset=tiny",
            "data.patch_size=32", "data.samples=8", "location.precision=bf16-mixed", "location.strategy=ddp",
            f"location.backend={'nccl' if device == 'cuda' else 'gloo'}", "location.devices=1",
            f"location.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "location.num_workers=0"]


def script_runs(device: str, root: Path) -> list[tuple[str, list[str]]]:
    """``(script, overrides)`` in the order they depend on each other."""
    common = smoke_overrides(device, root)
    train = [*common, "trainer.max_steps=2", "diffusion.sample_every_n_steps=0", "trainer.enable_progress_bar=false"]
    diff_run = H.compose("train_diff", "tiny", tuple(train)).run_name
    ssl = [*common, "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    ssl_run = H.compose("pretrain_ssl", "tiny", tuple(ssl)).run_name
    pretrained = root / "results" / "runs" / "pretrain_ssl" / ssl_run / "pretrained_unet.pt"
    return [("train_diff.py", train),
            ("predict_diff.py", [*common, f"+ckpt_name={diff_run}", "+predict_dir=gpu_check", "num_pairs=2",
                                 "steps=2", "progress=false"]),
            ("train_seg.py", [*common, "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]),
            ("pretrain_ssl.py", ssl),
            ("finetune_ssl.py", [*ssl, f"pretrained={pretrained}"])]


def run_scripts(device: str, root: Path) -> list[dict]:
    rows = []
    for script, overrides in script_runs(device, root):
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, str(H.ROOT / script), *overrides], cwd=H.ROOT, capture_output=True,
                                  text=True, timeout=SCRIPT_TIMEOUT_S, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
            rc, tail = done.returncode, (done.stdout + done.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", f"over {SCRIPT_TIMEOUT_S} s"
        rows.append({"script": script, "ok": rc == 0, "rc": rc, "seconds": time.perf_counter() - start,
                     **({} if rc == 0 else {"tail": tail})})
        print(f"  {script}: {'ok' if rc == 0 else 'FAILED (' + str(rc) + ')'} in {rows[-1]['seconds']:.0f} s",
              file=sys.stderr, flush=True)
    return rows


def measure(device: str, quick: bool, settings: tuple[str, ...] = ()) -> dict:
    from benchmarks import diffusion as D

    preset, batch, latent = ("tiny", 2, 32) if device == "cpu" else ("paper", 8, 64)
    repeats = H.Repeats(1, 1 if quick else 3)
    peak = H.matmul_peak_gflops(device, torch.bfloat16, size=256 if device == "cpu" else None)
    train = D.measure_training(device, D.TrainSetup(preset, "bf16"), batch, latent, repeats)
    setup = D.default_sample_setup(preset, ("location.precision=bf16-mixed",))
    pair = D.measure_sampling(device, preset, [setup], 1, latent // 2 if device == "cuda" else latent, repeats,
                              max_seconds=60.0, probe_steps=2, overrides=("location.precision=bf16-mixed",))[0]
    out = {"bf16_peak_tflops": peak / 1e3, "preset": preset, "settings": {}}
    for setting in settings:
        r = D.measure_training(device, D.TrainSetup(preset, "bf16", overrides=(setting,)), batch, latent, repeats)
        seconds = H.median(r["times"])
        out["settings"][setting] = {"seconds": seconds, "tflops": r["flops"] / seconds / 1e12,
                                    "of_peak": r["flops"] / seconds / 1e9 / peak, "peak_mib": r["peak_mib"]}
    for name, r, what in (("training step", train, f"batch {batch} at {train['image_size']} px"),
                          ("synthetic pair", pair, f"{setup.label}, {pair['calls']} calls, {pair['image_size']} px")):
        seconds = H.median(r["times"])
        tflops = r["flops"] / seconds / 1e12
        out[name] = {"what": what, "seconds": seconds, "tflops": tflops, "of_peak": tflops * 1e3 / peak,
                     "peak_mib": r["peak_mib"], "extrapolated": bool(r.get("extrapolated"))}
    return out


def report(device: str, scripts: list[dict], timed: dict, total: float) -> str:
    lines = [f"# GPU check ({H.describe_environment(device).splitlines()[0]})", "",
             f"total {total:.0f} s including imports ({'within' if total <= BUDGET_S else 'OVER'} the {BUDGET_S} s budget); "
             f"bf16 matmul peak {timed['bf16_peak_tflops']:.1f} TFLOP/s", "",
             H.markdown_table(["script (bf16-mixed, DDP world size 1)", "result", "seconds"],
                              [[s["script"], "ok" if s["ok"] else f"FAILED ({s['rc']})", f"{s['seconds']:.0f}"]
                               for s in scripts]), ""]
    rows = []
    for name in ("training step", "synthetic pair"):
        r = timed[name]
        goal = f" (goal {GOAL:.0%}: {'met' if r['of_peak'] >= GOAL else 'NOT met'})" if name == "training step" else ""
        rows.append([f"{timed['preset']} preset {name}, {r['what']}", f"{r['seconds']:.3f} s", f"{r['tflops']:.2f}",
                     f"{r['of_peak']:.1%}{goal}", f"{r['peak_mib']:.0f}"])
    for setting, r in timed["settings"].items():
        rows.append([f"training step with {setting}", f"{r['seconds']:.3f} s", f"{r['tflops']:.2f}",
                     f"{r['of_peak']:.1%}", f"{r['peak_mib']:.0f}"])
    lines.append(H.markdown_table(["measured (bf16-mixed)", "median", "TFLOP/s", "of bf16 peak", "peak memory MiB"],
                                  rows))
    failed = [s for s in scripts if not s["ok"]]
    for s in failed:
        lines += ["", f"## {s['script']} failed", "", "```", s["tail"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="one timed repetition (CI's dry run)")
    parser.add_argument("--out", type=Path, default=H.ROOT / "results" / "gpu_check")
    parser.add_argument("--skip-scripts", action="store_true", help="timings only")
    parser.add_argument("--settings", nargs="*", default=None,
                        help="overrides timed as extra training-step rows (default: SETTINGS on cuda, the first on cpu)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < 1:
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu --quick for the dry run")
    H.configure_torch(args.device, None)
    H.quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        scripts = [] if args.skip_scripts else run_scripts(args.device, Path(tmp))
    settings = args.settings if args.settings is not None else SETTINGS if args.device == "cuda" else SETTINGS[:1]
    timed = measure(args.device, args.quick, tuple(settings))
    total = time.perf_counter() - STARTED
    text = report(args.device, scripts, timed, total)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps({"device": args.device, "total_s": total, "budget_s": BUDGET_S,
                                                         "scripts": scripts, **timed}, indent=2, default=str))
    print(text)
    return 0 if all(s["ok"] for s in scripts) else 1


if __name__ == "__main__":
    sys.exit(main())
