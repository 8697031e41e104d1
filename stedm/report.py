"""Compare test results of several runs: a table, a Markdown file and a plot of the per-case IoU.

``python -m stedm.report RUN_DIR [RUN_DIR ...] [--out FILE.png]`` reads every
``metrics_{tag}.json`` / ``per_case_{tag}.csv`` pair that :class:`stedm.evaluation.Evaluator`
results were saved as and labels each run by its arm, read from its ``resolved_config.yaml``:
the task (``seg``; ``ssl pretrained`` / ``ssl scratch``), the data entries with their ratios,
the preset, and whatever else tells runs with the same arm apart (``seed=1``). It prints one row
per (run, tag), writes the same table as ``FILE.md`` beside the PNG, and the PNG: the per-case
foreground IoU of each (run, tag) as a box with its cases, each case joined across the columns
(the paper's claim is about this spread: a case that improves is a rising line), the y-range
fitted to the data, and a second panel with the per-case variance of each column.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from stedm.config import flatten
from stedm.evaluation import METRICS_FILE, PER_CASE_FILE

COLUMNS = {"iou_fg": "IoU", "case_iou_fg_var": "case var", "hd95": "HD95", "aji": "AJI"}
TASKS = {"train_seg": "seg", "finetune_ssl": "ssl"}
RUN_CONFIG = "resolved_config.yaml"
IGNORED_KEYS = ("location.", "hydra.", "run_name", "logger", "wandb.", "trainer.enable_progress_bar")
"""Config keys that never tell arms apart (paths, logging)."""


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


# -- labels ---------------------------------------------------------------------------------------
def run_config(run_dir: str | Path) -> dict:
    """The run's resolved config (``{}`` when the directory holds none)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / RUN_CONFIG
    return OmegaConf.to_container(OmegaConf.load(path)) or {} if path.is_file() else {}


def arm_label(cfg: dict) -> str:
    """``seg · demo_anno 0.5 + demo_syn 0.5 · tiny`` (task, data entries with ratios, preset)."""
    if not cfg:
        return ""
    task = TASKS.get(cfg.get("task"), str(cfg.get("task", "")))
    if cfg.get("task") == "finetune_ssl":
        task += " scratch" if cfg.get("from_scratch") else f" pretrained ({cfg.get('pretrained_weights', 'ema')})"
    data = cfg.get("data") or {}
    entries = list((data.get("dataset") or {}).keys())
    ratios = data.get("ratios")
    if ratios and len(entries) > 1:
        entries = [f"{name} {float(r):g}" for name, r in zip(entries, ratios)]
    preset = (cfg.get("preset") or {}).get("name")
    return " · ".join(str(p) for p in [task, " + ".join(entries), preset] if p)


def run_labels(run_dirs: list[str | Path]) -> dict[str, str]:
    """A short label per run directory, distinct among them: its arm, then the settings that tell
    runs of the same arm apart (``seed=1``), then the directory name where nothing else does."""
    configs = {str(d): run_config(d) for d in run_dirs}
    labels = {d: arm_label(cfg) or Path(d).name for d, cfg in configs.items()}
    for label in set(labels.values()):
        same = [d for d in labels if labels[d] == label]
        if len(same) < 2:
            continue
        flat = {d: {k: v for k, v in flatten(configs[d]).items() if not k.startswith(IGNORED_KEYS)} for d in same}
        keys = sorted({k for d in same for k in flat[d]})
        differing = [k for k in keys if len({json.dumps(flat[d].get(k), default=str) for d in same}) > 1]
        for d in same:
            extra = list(dict.fromkeys(f"{k.rsplit('.', 1)[-1]}={flat[d].get(k)}" for k in differing))[:2]
            labels[d] = " · ".join([label, *extra])
    counts = pd.Series(list(labels.values())).value_counts()
    return {d: (f"{label} · {Path(d).name}" if counts[label] > 1 else label) for d, label in labels.items()}


# -- table ----------------------------------------------------------------------------------------
def summary_table(runs: dict[str, list[dict]], labels: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per (run, tag): IoU, per-case mean ± std, per-case variance, HD95 and AJI if present."""
    rows = []
    for name, results in runs.items():
        for result in results:
            m = result["metrics"]
            row = {"run": (labels or {}).get(name, name), "tag": result["tag"], "IoU": m.get("iou_fg", math.nan),
                   "case IoU": f"{m.get('case_iou_fg_mean', math.nan):.4f} ± {m.get('case_iou_fg_std', math.nan):.4f}"}
            row.update({label: m[key] for key, label in COLUMNS.items() if key != "iou_fg" and key in m})
            rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame, run_dirs: dict[str, str]) -> str:
    """The summary as a Markdown table, and which directory each label stands for."""
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    lines += ["", "Runs:", ""] + [f"- **{label}**: `{d}`" for d, label in run_dirs.items()]
    return "\n".join(lines) + "\n"


# -- plot -----------------------------------------------------------------------------------------
def _columns(runs: dict[str, list[dict]]) -> list[tuple[str, str, pd.Series]]:
    """``(run, tag, per-case IoU indexed by case)`` per plotted column."""
    columns = []
    for name, results in runs.items():
        for result in results:
            cases = result["per_case"]
            if "iou_fg" in cases:
                iou = cases.set_index(cases["case"].astype(str) if "case" in cases else cases.index)["iou_fg"]
                iou = iou.dropna()
            else:
                iou = pd.Series(dtype=float)
            columns.append((name, result["tag"], iou))
    return columns


def fitted_range(values: list[np.ndarray], margin: float = 0.1) -> tuple[float, float]:
    """A y-range around all values (``margin`` of their span each side, at least 0.02), within [0, 1]."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values] or [np.array([])])
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    pad = max(margin * (high - low), 0.02)
    return max(0.0, low - pad), min(1.0, high + pad)


def plot_case_iou(runs: dict[str, list[dict]], out: str | Path, labels: dict[str, str] | None = None) -> Path:
    """Top: per-case IoU per (run, tag), boxes with the cases on top, each case joined across the
    columns; bottom: the per-case variance of each column. One colour per run, named in the legend."""
    labels = labels or {name: name for name in runs}
    columns = _columns(runs)
    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    positions = np.arange(1, len(columns) + 1)
    fig = Figure(figsize=(max(8.0, 1.3 * len(columns) + 5.0), 7.0))  # room for the legend on the right
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    values = [iou.to_numpy(dtype=float) for _, _, iou in columns]
    box = top.boxplot([v if v.size else [np.nan] for v in values], positions=positions, showfliers=False,
                      widths=0.45, patch_artist=True)
    for patch, (name, _, _) in zip(box["boxes"], columns):
        patch.set(facecolor=colours[name], alpha=0.25, edgecolor=colours[name])
    cases = sorted({case for _, _, iou in columns for case in iou.index})
    for case in cases:  # a case's IoU across the columns that have it
        xs = [p for p, (_, _, iou) in zip(positions, columns) if case in iou.index]
        ys = [float(iou[case]) for _, _, iou in columns if case in iou.index]
        if len(xs) > 1:
            top.plot(xs, ys, color="0.55", linewidth=0.7, alpha=0.6, zorder=1)
    for position, (name, _, iou) in zip(positions, columns):
        top.scatter(np.full(iou.size, position), iou.to_numpy(dtype=float), s=16, color=colours[name], zorder=2,
                    edgecolors="white", linewidths=0.4)
    top.set_ylim(*fitted_range(values))
    top.set_ylabel("per-case foreground IoU")
    top.set_title(f"Per-case foreground IoU ({len(cases)} cases; lines join a case across runs)")
    top.grid(axis="y", alpha=0.3)
    short = {name: f"R{i + 1}" for i, name in enumerate(runs)}
    top.legend(handles=[Patch(facecolor=colours[n], alpha=0.6, label=f"{short[n]}: {labels[n]}") for n in runs],
               loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, title="run", frameon=False)
    variances = [float(np.var(v)) if v.size else math.nan for v in values]
    bottom.bar(positions, variances, width=0.45, color=[colours[n] for n, _, _ in columns], alpha=0.7)
    for position, variance in zip(positions, variances):
        if math.isfinite(variance):
            bottom.annotate(f"{variance:.4f}", (position, variance), ha="center", va="bottom", fontsize=8)
    finite = [v for v in variances if math.isfinite(v)]
    bottom.set_ylim(0, (max(finite) * 1.3 if finite and max(finite) > 0 else 1.0))
    bottom.set_ylabel("per-case variance")
    bottom.grid(axis="y", alpha=0.3)
    bottom.set_xticks(positions, [f"{short[n]} {tag}" for n, tag, _ in columns], fontsize=9,
                      rotation=30 if len(columns) > 6 else 0, ha="right" if len(columns) > 6 else "center")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories holding metrics_<tag>.json files")
    parser.add_argument("--out", default="per_case_iou.png",
                        help="PNG to write; the table goes beside it as .md (default: %(default)s)")
    args = parser.parse_args(argv)
    if Path(args.out).suffix.lower() != ".png":
        parser.error(f"--out {args.out}: give a .png path (the Markdown table goes beside it)")
    try:
        runs = {str(Path(d)): load_run(d) for d in args.run_dirs}
    except FileNotFoundError as error:
        parser.error(str(error))
    labels = run_labels(list(runs))
    table = summary_table(runs, labels)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    plot = plot_case_iou(runs, args.out, labels)
    markdown = plot.with_suffix(".md")
    markdown.write_text(markdown_table(table, labels))
    print(f"table: {markdown}")
    print(f"per-case IoU plot: {plot}")


if __name__ == "__main__":
    main()
