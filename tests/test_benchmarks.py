"""The benchmark harness's pure parts: repetition counting, FLOP counting, step probing, memory, tables.

No timing is asserted (timings belong to the benchmark tables); what is checked is that the
machinery counts what it claims to count.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import harness as H

M, K, N = 8, 16, 4


def test_median_and_spread():
    assert H.median([3.0, 1.0, 2.0]) == 2.0
    assert H.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert H.spread([0.002, 0.001, 0.003], scale=1e3, digits=1) == "2.0 (1.0–3.0)"
    with pytest.raises(ValueError, match="at least one timed repetition"):
        H.median([])


def test_repeats_need_warmup_and_reps():
    with pytest.raises(ValueError, match="warmup=0"):
        H.Repeats(warmup=0, reps=5)
    with pytest.raises(ValueError, match="reps=0"):
        H.Repeats(warmup=1, reps=0)


def test_time_call_calls_warmup_plus_reps_and_times_reps():
    calls = []
    times = H.time_call(lambda: calls.append(1), H.Repeats(warmup=2, reps=3), "cpu")
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_matmul_flops_are_2mnk():
    a, b = torch.randn(M, K), torch.randn(K, N)
    assert H.count_flops(lambda: a @ b) == 2 * M * N * K


def test_backward_flops_are_counted():
    # d(sum(a @ b))/da = ones @ b.T: one more M x N x K matmul (b needs no gradient).
    a, b = torch.randn(M, K, requires_grad=True), torch.randn(K, N)
    assert H.count_flops(lambda: (a @ b).sum().backward()) == 2 * (2 * M * N * K)


def test_gflops_per_s():
    assert H.gflops_per_s(6e9, 2.0) == pytest.approx(3.0)


def test_step_probe_splits_time_and_flops_per_step():
    a, b = torch.randn(M, K), torch.randn(K, N)
    with H.flop_counter() as counter:
        probe = H.StepProbe("cpu", counter)
        for steps_done, matmuls in enumerate(probe([1, 2, 3])):
            for _ in range(matmuls):
                a @ b
    assert steps_done == 2
    assert probe.step_flops == [2 * M * N * K * k for k in (1, 2, 3)]
    assert len(probe.step_times) == 3 and all(t >= 0 for t in probe.step_times)


def test_peak_memory_sees_a_transient_cpu_allocation():
    size_mib = 256
    with H.PeakMemory("cpu", interval=0.001) as memory:
        before = H.current_rss_bytes()
        block = torch.ones(size_mib * H.MIB // 4)  # float32, every page written
        time.sleep(0.05)
        del block
    assert memory.peak_mib >= before / H.MIB + 0.9 * size_mib
    assert memory.label == "peak RSS (MiB)"


def test_markdown_table():
    table = H.markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | y |"]
    with pytest.raises(ValueError, match="2 headers"):
        H.markdown_table(["a", "b"], [[1]])


def test_percent_of_peak():
    assert H.percent_of_peak(25.0, 100.0) == "25 %"
    assert H.percent_of_peak(25.0, None) == "n/a"


def test_comparison_reports_speedup_target_and_memory_ratio():
    fast = H.Comparison("step of x", "step", "fast way", H.Measured([4.0, 2.0, 3.0], 6e9, 1000.0, 1.0),
                        H.Measured([1.0, 2.0, 1.0], 6e9, 1050.0, 1.2), target=2.5, memory_target=1.1)
    assert fast.speedup == pytest.approx(3.0) and fast.memory_ratio == pytest.approx(1.05)
    slow = H.Comparison("pair", "pair", "other way", H.Measured([2.0]), H.Measured([1.0], peak_mib=None), target=4.0)
    assert slow.memory_ratio is None
    lines = H.comparison_table([fast, slow], fp32_peak=4.0, memory_label="peak RSS (MiB)").splitlines()
    assert len(lines) == 4
    assert "| 3.00× | ≥ 2.5× yes |" in lines[2] and "1.05 (ok)" in lines[2]
    assert "2.0 (50 %)" in lines[2]  # 6 GFLOP in the reference's median 3 s, against a peak of 4
    assert "| 2.00× | ≥ 4× **no** |" in lines[3] and "| n/a |" in lines[3]
