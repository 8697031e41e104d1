"""Compare test results of several runs: a table and a plot of the per-case IoU distributions.

``python -m stedm.report RUN_DIR [RUN_DIR ...] [--out FILE.png]`` reads every
``metrics_{tag}.json`` / ``per_case_{tag}.csv`` pair that :class:`stedm.evaluation.Evaluator`
results were saved as, prints one row per (run, tag) and writes a PNG with the per-case
foreground IoU of each (run, tag) side by side - the paper's claim is about this spread.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stedm.evaluation import METRICS_FILE, PER_CASE_FILE

COLUMNS = {"iou_fg": "IoU", "case_iou_fg_var": "case var", "hd95": "HD95", "aji": "AJI"}


def load_run(run_dir: str | Path) -> list[dict]:
    """Every tagged result of a run directory: ``[{"tag", "metrics", "per_case"}]`` sorted by tag."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory '{run_dir}' does not exist")
    prefix, suffix = METRICS_FILE.split("{tag}")
    found = sorted(run_dir.glob(METRICS_FILE.format(tag="*")))
    if not found:
        raise FileNotFoundError(
            f"'{run_dir}' holds no {METRICS_FILE.format(tag='<tag>')} files; pass the directory a test "
            "run wrote its metrics into (the run's output directory)")
    results = []
    for path in found:
        tag = path.name[len(prefix):-len(suffix)]
        metrics = {k: (math.nan if v is None else v) for k, v in json.loads(path.read_text()).items()}
        cases_path = run_dir / PER_CASE_FILE.format(tag=tag)
        per_case = pd.read_csv(cases_path) if cases_path.exists() else pd.DataFrame()
        results.append({"tag": tag, "metrics": metrics, "per_case": per_case})
    return results


def summary_table(runs: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per (run, tag): IoU, per-case mean ± std, per-case variance, HD95 and AJI if present."""
    rows = []
    for name, results in runs.items():
        for result in results:
            m = result["metrics"]
            row = {"run": name, "tag": result["tag"], "IoU": m.get("iou_fg", math.nan),
                   "case IoU": f"{m.get('case_iou_fg_mean', math.nan):.4f} ± {m.get('case_iou_fg_std', math.nan):.4f}"}
            row.update({label: m[key] for key, label in COLUMNS.items() if key != "iou_fg" and key in m})
            rows.append(row)
    return pd.DataFrame(rows)


def plot_case_iou(runs: dict[str, list[dict]], out: str | Path) -> Path:
    """Box plot with the individual cases on top, one column per (run, tag)."""
    labels, values = [], []
    for name, results in runs.items():
        for result in results:
            cases = result["per_case"]
            iou = cases["iou_fg"].dropna().to_numpy() if "iou_fg" in cases else np.array([])
            labels.append(f"{name}\n{result['tag']}")
            values.append(iou)
    # A bare Figure renders with Agg and leaves pyplot's global backend state alone.
    fig = Figure(figsize=(max(4.0, 1.6 * len(labels)), 4.0))
    ax = fig.subplots()
    ax.boxplot(values, showfliers=False)
    jitter = np.random.default_rng(0)
    for position, iou in enumerate(values, start=1):
        ax.scatter(position + jitter.uniform(-0.12, 0.12, iou.size), iou, s=10, alpha=0.6)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_ylabel("per-case foreground IoU")
    ax.set_ylim(0.0, 1.0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories holding metrics_<tag>.json files")
    parser.add_argument("--out", default="per_case_iou.png", help="PNG to write (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        runs = {str(Path(d)): load_run(d) for d in args.run_dirs}
    except FileNotFoundError as error:
        parser.error(str(error))
    table = summary_table(runs)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"per-case IoU plot: {plot_case_iou(runs, args.out)}")


if __name__ == "__main__":
    main()
