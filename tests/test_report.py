"""`python -m stedm.report` on run directories written by the real result writer."""

import math

import matplotlib.image
import pytest

from stedm.evaluation import EvaluationResult
from stedm.report import main


def write_run(run_dir, tag, case_iou):
    metrics = {"iou_fg": 0.8, "case_iou_fg_mean": sum(case_iou) / len(case_iou), "case_iou_fg_std": 0.1,
               "case_iou_fg_var": 0.01, "hd95": 3.5, "aji": math.nan}
    per_case = [{"case": f"p{i}", "n_units": 1, "iou_fg": v} for i, v in enumerate(case_iou)]
    EvaluationResult(metrics, per_case).save(run_dir, tag)


def test_report_prints_table_and_writes_plot(tmp_path, capsys):
    baseline, synthetic = tmp_path / "baseline", tmp_path / "synthetic"
    write_run(baseline, "last", [0.5, 0.7, math.nan])
    write_run(baseline, "best", [0.6, 0.7, 0.8])
    write_run(synthetic, "best", [0.75, 0.8, 0.85])
    out = tmp_path / "plots" / "cases.png"
    main([str(baseline), str(synthetic), "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert "IoU" in lines[0] and "HD95" in lines[0] and "AJI" in lines[0]
    rows = [line for line in lines[1:4]]
    assert [row.split()[1] for row in rows] == ["best", "last", "best"]  # tags, sorted per run
    assert "0.7000 ± 0.1000" in rows[0]  # per-case mean ± std of baseline/best
    assert str(out) in lines[-1]
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # three columns side by side, legend beside
    assert (out.with_suffix(".md")).is_file() and f"table: {out.with_suffix('.md')}" in lines[-2]


def test_report_names_a_directory_without_metrics(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "holds no metrics_<tag>.json" in capsys.readouterr().err


def write_config(run_dir, task="train_seg", entries=("demo_anno",), ratios=None, seed=0, **extra):
    import yaml

    cfg = {"task": task, "seed": seed, "preset": {"name": "tiny"}, "location": {"result_dir": str(run_dir)},
           "run_name": run_dir.name, "data": {"dataset": {e: {"role": "labelled"} for e in entries}, "ratios": ratios},
           **extra}
    (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(cfg))


def test_report_labels_the_demo_arms_and_writes_markdown(tmp_path, capsys):
    """The demo's four runs: labels say the arm (entries + ratios, preset, pretrained/scratch), distinct."""
    runs = {"seg_real": dict(), "seg_mix": dict(entries=("demo_anno", "demo_syn"), ratios=[0.5, 0.5]),
            "ssl_pre": dict(task="finetune_ssl", from_scratch=False, pretrained_weights="ema"),
            "ssl_scratch": dict(task="finetune_ssl", from_scratch=True)}
    for i, (name, options) in enumerate(runs.items()):
        write_run(tmp_path / name, "best", [0.60 + 0.01 * i, 0.62 + 0.01 * i, 0.64])
        write_config(tmp_path / name, **options)
    out = tmp_path / "report.png"
    main([str(tmp_path / n) for n in runs] + ["--out", str(out)])
    table = (tmp_path / "report.md").read_text()
    labels = ["seg · demo_anno · tiny", "seg · demo_anno 0.5 + demo_syn 0.5 · tiny",
              "ssl pretrained (ema) · demo_anno · tiny", "ssl scratch · demo_anno · tiny"]
    for label, name in zip(labels, runs):
        assert f"| {label} | best |" in table and f"- **{label}**: `{tmp_path / name}`" in table
    assert "table: " in capsys.readouterr().out


def test_runs_of_one_arm_are_told_apart_by_what_differs(tmp_path):
    from stedm.report import run_labels

    for seed in (0, 1):
        (tmp_path / f"s{seed}").mkdir()
        write_config(tmp_path / f"s{seed}", seed=seed)
    labels = run_labels([tmp_path / "s0", tmp_path / "s1"])
    assert list(labels.values()) == ["seg · demo_anno · tiny · seed=0", "seg · demo_anno · tiny · seed=1"]


def test_report_fits_the_y_range_and_pairs_cases(tmp_path):
    from stedm.report import _columns, fitted_range, load_run

    write_run(tmp_path / "a", "best", [0.80, 0.82, 0.84])
    write_run(tmp_path / "b", "best", [0.83, 0.85, 0.86])
    low, high = fitted_range([c[2].to_numpy() for c in _columns({d: load_run(tmp_path / d) for d in "ab"})])
    assert 0.75 < low < 0.80 and 0.86 < high < 0.9  # differences of 0.01-0.05 fill the panel, not 0-1
    columns = _columns({d: load_run(tmp_path / d) for d in "ab"})
    assert list(columns[0][2].index) == list(columns[1][2].index) == ["p0", "p1", "p2"]  # joined by case
