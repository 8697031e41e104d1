"""SSL pretraining step time and peak memory of the GenSelfDiff-HIS U-Net presets.

One step = P2-weighted diffusion loss (:meth:`SSLPretrainer.diffusion_loss`), backward, Adam
step and EMA update, in fp32 and under bf16 autocast where the hardware runs bf16 natively
(CUDA: ``torch.cuda.is_bf16_supported()``; CPU: oneDNN's bf16 check). Each configuration runs
in a fresh process so peak memory is its own: CUDA reports the peak allocated tensor memory,
CPU the process's peak resident set (which includes the ~0.4 GiB of the Python/torch runtime).

    python benchmarks/ssl_pretrain.py                          # default + tiny, batch 8, 256 px (the paper)
    python benchmarks/ssl_pretrain.py --batch-size 2 --size 128 --steps 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from stedm.models.ssl_unet import build_ssl_unet
from stedm.modules.ssl_pretrain import SSLPretrainer


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def measure(preset: str, precision: str, device: str, batch_size: int, size: int, steps: int, warmup: int) -> dict:
    """Run ``warmup + steps`` pretraining steps; return the median step time and peak memory."""
    torch.manual_seed(0)
    module = SSLPretrainer(build_ssl_unet(preset)).to(device)
    module.ema.to(device=device)
    optimizer = module.configure_optimizers()
    images = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = module.diffusion_loss(images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.ema.step(module.net.parameters())
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"params": sum(p.numel() for p in module.net.parameters()), "step_s": statistics.median(times),
            "peak_mib": peak_mib, "loss": loss.item()}


def measure_in_fresh_process(**kwargs) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(measure, **kwargs).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["default", "tiny"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    memory = "peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"SSL pretraining step on {device_name}, batch {args.batch_size}, {args.size} px, "
          f"median of {args.steps} steps after {args.warmup} warm-up, torch {torch.__version__}\n")
    print(f"| preset | params (M) | precision | step (ms) | images/s | {memory} (MiB) |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        for precision in args.precisions:
            if precision == "bf16" and not bf16_supported(args.device):
                print(f"| {preset} | | bf16 | skipped: no native bf16 on this {args.device} | | |")
                continue
            r = measure_in_fresh_process(preset=preset, precision=precision, device=args.device,
                                         batch_size=args.batch_size, size=args.size, steps=args.steps,
                                         warmup=args.warmup)
            print(f"| {preset} | {r['params'] / 1e6:.2f} | {precision} | {1000 * r['step_s']:.0f} | "
                  f"{args.batch_size / r['step_s']:.1f} | {r['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
