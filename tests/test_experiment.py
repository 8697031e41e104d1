"""The multi-seed protocol (stedm/experiment.py): its statistics, its arms' run identities, the
SLURM staging, the HED-jitter baseline, and the protocol end to end at smoke size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from stedm.data.transforms import seed_transform, train_transform
from stedm.experiment import ARMS, STAGES, mean_ci, paired, parse, plan, schedule, table


def test_mean_ci_is_student_t_of_known_data():
    data = [0.61, 0.55, 0.70, 0.64]
    mean, half = mean_ci(data)
    low, high = stats.t.interval(0.95, len(data) - 1, loc=np.mean(data), scale=stats.sem(data))
    assert mean == pytest.approx(np.mean(data))
    assert (mean - half, mean + half) == pytest.approx((low, high))
    assert math.isnan(mean_ci([0.5])[1])  # one seed: no interval, not a zero-width one


def test_paired_ci_is_on_the_per_seed_differences():
    a, b = [0.50, 0.60, 0.55], [0.45, 0.52, 0.53]
    mean, half = paired(a, b)
    diff = np.subtract(a, b)
    assert mean == pytest.approx(diff.mean())
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * diff.std(ddof=1) / math.sqrt(3))
    # pairing removes the seed-to-seed spread the arms share: narrower than either arm's CI
    assert half < mean_ci(a)[1]
    with pytest.raises(ValueError, match="same seeds"):
        paired([0.1, 0.2], [0.1])


def test_table_flags_a_ci_above_zero():
    arms = {"A": [0.40, 0.42, 0.41], "C": [0.50, 0.51, 0.52]}
    results = {"arms": {k: [{"iou_fg": v, "case_iou_fg_mean": v} for v in vals] for k, vals in arms.items()},
               "qc": {}}
    text = table(results)
    assert "| C − A | +0.100 ±" in text and text.rstrip().endswith("| yes |")


def test_arm_run_identities_distinct(compose_cfg):
    from stedm.resume import identity

    options = parse([])
    steps = {s.name: s for s in plan(options)}
    assert set(ARMS) <= set(steps)
    trained = [s for s in steps.values() if s.script not in ("qc", "predict_diff")]
    names = [s.run_name for s in trained]
    assert len(set(names)) == len(names), names
    assert "hed0.2" in steps["B"].run_name
    configs = {s.name: compose_cfg(s.script, [o.replace("@SEED@", "0") for o in s.overrides] + ["seed=0"])
               for s in trained}
    seg = {k: identity(c) for k, c in configs.items() if c.task == "train_seg"}
    assert seg["B"]["data.augment.hed_jitter"] == 0.2 and "data.augment.hed_jitter" not in seg["A"]
    for arm, other in (("B", "A"), ("C", "D"), ("C", "A")):
        assert seg[arm] != seg[other], (arm, other)
    assert configs["gen_D"].style_sampling.name == "none" and configs["gen_C"].style_sampling.name != "none"
    assert configs["E"].run_name != configs["F"].run_name


def test_slurm_plan_is_one_sweep_per_step_stage_by_stage():
    options = parse(["seeds=3", "hydra/launcher=slurm", "location=cluster_cpu"])
    stages = schedule(options, plan(options))
    assert len(stages) == len(STAGES)
    first = {c[1] for c in stages[0]}
    assert {"train_diff.py", "train_seg.py", "pretrain_ssl.py", "finetune_ssl.py"} == first
    sweeps = [c for stage in stages for c in stage if c[1] != "-m"]
    assert all(c[2] == "-m" and c[-1] == "seed=0,1,2" and "hydra/launcher=slurm" in c for c in sweeps)
    # the generators train before they sample, the pairs exist before they are used
    order = [next(i for i, stage in enumerate(stages) for c in stage if any(key in a for a in c))
             for key in ("style_sampling=none", "+ckpt_name=", "folder_name=protocol_D_seed${seed}")]
    assert order == sorted(order) and len(set(order)) == 3
    assert any("+predict_dir=protocol_C_seed${seed}" in c for c in stages[1])
    assert [c for c in stages[2] if c[1] == "-m"] and len([c for c in stages[2] if c[1] == "-m"]) == 6  # QC per seed


def test_local_plan_runs_seed_by_seed_each_seed_in_stage_order():
    options = parse(["seeds=2", "arms=C"])
    groups = schedule(options, plan(options))
    assert len(groups) == 2 * len(STAGES)
    seeds = [{a for c in g for a in c if a.startswith("seed=")} for g in groups]
    assert seeds[:3] == [{"seed=0"}] * 3 and seeds[3:] == [{"seed=1"}] * 3  # seed 0 whole before seed 1
    flat = [c for g in groups[:3] for c in g]
    at = lambda key: next(i for i, c in enumerate(flat) if any(key in a for a in c))  # noqa: E731
    assert at("+ckpt_name=") < at("stedm.qc") < at("folder_name=protocol_C_seed0")  # train -> sample -> use


def test_tabulates_only_the_seeds_whose_every_arm_finished(tmp_path, capsys):
    import json

    from stedm.experiment import collect

    options = parse(["seeds=3", "arms=A,B", f"location.result_dir={tmp_path}"])
    steps = plan(options)
    iou = {("A", 0): 0.40, ("B", 0): 0.45, ("A", 1): 0.42, ("B", 1): 0.46, ("A", 2): 0.41}  # B seed 2 unfinished
    for (arm, seed), value in iou.items():
        step = next(s for s in steps if s.name == arm)
        run = tmp_path / "runs" / "train_seg" / step.run_name.replace("@SEED@", str(seed))
        run.mkdir(parents=True)
        (run / "metrics_best.json").write_text(json.dumps({"iou_fg": value, "case_iou_fg_mean": value}))
    results = collect(options, steps)
    assert results["seeds"] == [0, 1]
    assert [r["iou_fg"] for r in results["arms"]["B"]] == [0.45, 0.46]
    assert "seed 2 left out" in capsys.readouterr().out
    assert "| A | real only | 2 |" in table(results)
    with pytest.raises(FileNotFoundError, match="no seed of 1"):
        collect(parse(["seeds=1", "arms=A", f"location.result_dir={tmp_path / 'empty'}"]), steps[:1])
    with pytest.raises(ValueError, match="tabulate_only=yes"):
        parse(["tabulate_only=yes"])


def test_arms_pull_in_what_they_need_and_bad_options_are_named():
    names = [s.name for s in plan(parse(["arms=C"]))]
    assert names == ["A", "gen_C", "pairs_C", "qc_C", "C"]
    with pytest.raises(ValueError, match="arms=Z"):
        parse(["arms=Z"])
    with pytest.raises(ValueError, match="seeds=0"):
        parse(["seeds=0"])
    with pytest.raises(ValueError, match="train_dif:"):
        parse(["train_dif:trainer.max_steps=1"])


def test_hed_jitter_changes_stain_not_layout():
    from stedm.data.datasets.demo import stained_region
    from stedm.metrics.stain import mean_optical_density

    image = np.ascontiguousarray(stained_region(0, 4, 0))
    mask = (np.arange(128 * 128).reshape(128, 128) % 3).astype(np.uint8)
    plain, jitter = train_transform(64), train_transform(64, hed_jitter=0.2)
    seed_transform(plain, 3)
    seed_transform(jitter, 3)
    a, b = plain(image=image, mask=mask), jitter(image=image, mask=mask)
    assert np.array_equal(a["mask"], b["mask"])  # same crop and orientation: only the stain moved
    assert np.linalg.norm(mean_optical_density(a["image"]) - mean_optical_density(b["image"])) > 0.01
    with pytest.raises(ValueError, match="data.augment.hed_jitter"):
        train_transform(64, hed_jitter=-0.1)


@pytest.mark.e2e
def test_protocol_end_to_end_smoke(tmp_path):
    from stedm.experiment import main

    results = main(["seeds=1", "num_pairs=4", f"location.result_dir={tmp_path}", "data.samples=8",
                    "data.patch_size=32", "trainer.max_epochs=1", "location.precision=32-true",
                    "trainer.enable_progress_bar=false", "predict_diff:steps=2"])
    assert set(results["arms"]) == set(ARMS)
    assert all(0 <= row["iou_fg"] <= 1 for rows in results["arms"].values() for row in rows)
    assert set(results["qc"]) == {"C", "D"} and results["qc"]["C"][0]["style_ratio"] is not None
    out = tmp_path / "protocol"
    assert (out / "figure.png").stat().st_size > 0
    assert "| C − D |" in (out / "table.md").read_text()
