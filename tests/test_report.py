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
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # three columns side by side


def test_report_names_a_directory_without_metrics(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "holds no metrics_<tag>.json" in capsys.readouterr().err
