"""The multi-seed protocol: ``python -m stedm.experiment [seeds=3] [data=demo] [preset=tiny] ...``.

For each seed it runs, with the five scripts and exactly the commands a user would type (each
printed before it runs, its output in ``<result_dir>/protocol/logs/``):

- **A** real only (``train_seg.py``);
- **B** real + HED stain jitter (``data.augment.hed_jitter``, the recipe of the demo's stain
  simulation, Tellez et al.'s "HED-strong" sigma 0.2; run name ``...-hed0.2-...``);
- **C** real + STEDM pairs: ``train_diff.py`` (this seed) -> ``predict_diff.py`` (styles from the
  unlabelled pool) -> ``train_seg.py`` on real + pairs (``ratios``, default 0.5/0.5);
- **D** the same with a ``style_sampling=none`` generator (the ablation);
- **E** GenSelfDiff: ``pretrain_ssl.py`` -> ``finetune_ssl.py pretrained=...``; **F** ``from_scratch=true``;
- ``python -m stedm.qc`` on each pair folder (segmenter: arm A of the same seed).

A chain is staged: ``train`` (generators, A, B, pretraining, F) -> ``sample`` (pairs, E) -> ``use``
(QC, C, D). Locally the commands run one after another, seed by seed (all stages of seed 0, then
seed 1, ...: a run stopped early leaves whole seeds to tabulate); with ``hydra/launcher=slurm`` each step of
a stage is one Hydra sweep over the seeds (``script.py -m hydra/launcher=slurm ... seed=0,1,2``,
per-seed names through ``${seed}``), the sweeps of a stage run side by side, and a stage starts
when every sweep of the one before has finished (the submitit launcher returns when its jobs
end); the QC runs where the driver runs. Then it tabulates test IoU fg (best checkpoint) and
per-case IoU fg, per arm mean +/- 95 % CI and paired per-seed differences (Student t: B/C/D vs
A, C vs D, C vs B, E vs F), with the QC numbers of each pair folder, into
``<result_dir>/protocol/table.md`` and ``figure.png``, and prints the table.

Options (``key=value``): ``seeds`` (N, seeds 0..N-1; default 3), ``arms`` (e.g. ``A,C,D``;
default all; what they need runs too), ``hed_jitter`` (0.2), ``ratios`` (``0.5,0.5``),
``num_pairs`` (64), ``tabulate_only`` (``true``: run nothing, tabulate
the seeds whose every arm finished, e.g. after stopping a run; seeds missing an arm are named and
left out). ``SCRIPT:key=value`` goes to that script only (e.g.
``train_diff:trainer.max_steps=8``); any other ``key=value`` goes to all five scripts
(``location.result_dir`` defaults to ``results/protocol``, ``location.data_dir`` to
``<result_dir>/data``). A re-run continues: finished runs are only re-tested, done pairs kept,
and a changed setting is refused by the scripts themselves (run identity, pair settings).
Subprocesses get ``OMP_NUM_THREADS=1`` unless it is set (the tiny networks run fastest so).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stedm.compat import upgrade_qc_report

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SEED = "@SEED@"  # placeholder: a seed locally, ${seed} in a SLURM sweep
SCRIPTS = ("train_diff", "predict_diff", "train_seg", "pretrain_ssl", "finetune_ssl")
STAGES = ("train", "sample", "use")
ARMS = {"A": "real only", "B": "real + HED jitter", "C": "real + STEDM pairs",
        "D": "real + no-style pairs", "E": "GenSelfDiff pretrained", "F": "GenSelfDiff scratch"}
COMPARISONS = (("B", "A"), ("C", "A"), ("D", "A"), ("C", "D"), ("C", "B"), ("E", "F"))
METRICS = (("iou_fg", "test IoU fg"), ("case_iou_fg_mean", "per-case IoU fg"))
QC_KEYS = (("layout_fidelity_iou_mean", "layout IoU"), ("ceiling_real_test_iou_mean", "ceiling"),
           ("style_ratio", "style ratio"), ("kid_x1e3_synthetic_vs_real", "KID x1e3"))
OWN_KEYS = {"seeds": "3", "arms": ",".join(ARMS), "hed_jitter": "0.2", "ratios": "0.5,0.5", "num_pairs": "64",
            "tabulate_only": "false"}


# -- statistics --------------------------------------------------------------------------------
def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (``nan`` with one value)."""
    from scipy.stats import t

    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("mean_ci: no values")
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan
    return mean, float(t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))


def paired(a, b, level: float = 0.95) -> tuple[float, float]:
    """Mean and CI half-width of the per-seed differences ``a - b`` (same seeds, same order)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired: {a.size} vs {b.size} seeds; compare arms over the same seeds")
    return mean_ci(a - b, level)


# -- the plan ----------------------------------------------------------------------------------
@dataclass
class Step:
    """One command per seed (``SEED`` in ``overrides`` stands for the seed)."""
    name: str
    stage: str
    script: str                    # one of SCRIPTS, or "qc" (python -m stedm.qc)
    overrides: list[str]
    needs: list[str] = field(default_factory=list)
    run_name: str = ""             # the script's run name (SEED inside)


@dataclass
class Options:
    seeds: int
    arms: list[str]
    hed_jitter: float
    ratios: list[float]
    num_pairs: int
    common: list[str]
    per_script: dict[str, list[str]]
    slurm: bool
    result_dir: str
    data_dir: str
    tabulate_only: bool = False


def parse(argv: list[str]) -> Options:
    own, common, per_script, slurm = dict(OWN_KEYS), [], {s: [] for s in SCRIPTS}, False
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"python -m stedm.experiment: '{arg}' is not key=value (e.g. seeds=3, data=demo)")
        if key in own:
            own[key] = value
        elif ":" in key and key.split(":")[0] in SCRIPTS:
            script, _, rest = arg.partition(":")
            per_script[script].append(rest)
        elif ":" in key:
            raise ValueError(f"python -m stedm.experiment: '{arg}': the part before ':' must be one of "
                             f"{', '.join(SCRIPTS)}")
        else:
            slurm |= key == "hydra/launcher" and value == "slurm"
            if key == "hydra/launcher" and value != "slurm":
                raise ValueError(f"python -m stedm.experiment: hydra/launcher={value}: only slurm (or none: local)")
            common.append(arg)
    arms = [a.strip().upper() for a in own["arms"].split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"python -m stedm.experiment: arms={own['arms']}: choose from {','.join(ARMS)}")
    if own["tabulate_only"] not in ("true", "false"):
        raise ValueError(f"python -m stedm.experiment: tabulate_only={own['tabulate_only']}: true or false")
    if int(own["seeds"]) < 1:
        raise ValueError(f"python -m stedm.experiment: seeds={own['seeds']} must be >= 1")
    ratios = [float(r) for r in own["ratios"].strip("[]").split(",")]
    if len(ratios) != 2:
        raise ValueError(f"python -m stedm.experiment: ratios={own['ratios']}: two numbers, real and synthetic")
    found = dict(a.split("=", 1) for a in common)
    result_dir = found.get("location.result_dir", "results/protocol")
    data_dir = found.get("location.data_dir", f"{result_dir}/data")
    common = [a for a in common if not a.startswith(("location.result_dir=", "location.data_dir="))]
    common = [f"location.result_dir={result_dir}", f"location.data_dir={data_dir}", *common]
    if not any(a.startswith("preset=") for a in common):
        common.append("preset=tiny")
    return Options(int(own["seeds"]), arms, float(own["hed_jitter"]), ratios, int(own["num_pairs"]),
                   common, per_script, slurm, result_dir, data_dir, own["tabulate_only"] == "true")


def compose(script: str, overrides: list[str]):
    """The script's config as Hydra composes it (seed = a sentinel turned back into SEED)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    import stedm  # noqa: F401  (config resolvers)

    overrides = [o.replace(SEED, "987654321") for o in overrides if not o.startswith("hydra/")]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(script, overrides=overrides + ["seed=987654321"])


def _name(cfg) -> str:
    return str(cfg.run_name).replace("987654321", SEED)


def plan(options: Options) -> list[Step]:
    """Every step the chosen arms need, in stage order (names: gen_C, pairs_C, qc_C, A..F, ssl)."""
    o = options
    args = lambda script, *extra: [*o.common, *o.per_script.get(script, []), *extra]  # noqa: E731
    steps: dict[str, Step] = {}

    def add(name, stage, script, overrides, needs=()):
        step = Step(name, stage, script, overrides, list(needs))
        if script in SCRIPTS:
            step.run_name = _name(compose(script, overrides))
        steps[name] = step
        return step

    data = str(compose("train_seg", args("train_seg")).data.name)
    add("A", "train", "train_seg", args("train_seg"))
    hed = [f"++data.augment.hed_jitter={o.hed_jitter:g}"]
    template = compose("train_seg", args("train_seg", *hed))
    from omegaconf import OmegaConf

    name = OmegaConf.to_container(template, resolve=False)["run_name"].replace("-k${data", f"-hed{o.hed_jitter:g}-k${{data", 1)
    if f"-hed{o.hed_jitter:g}" not in name:
        name += f"-hed{o.hed_jitter:g}"
    add("B", "train", "train_seg", args("train_seg", *hed, f"run_name='{name}'"))
    for arm, sampling in (("C", []), ("D", ["style_sampling=none"])):
        gen = add(f"gen_{arm}", "train", "train_diff", args("train_diff", *sampling))
        folder = f"protocol_{arm}_seed{SEED}"
        add(f"pairs_{arm}", "sample", "predict_diff",
            args("predict_diff", f"+ckpt_name={gen.run_name}", f"+predict_dir={folder}", f"num_pairs={o.num_pairs}"),
            [gen.name])
        add(f"qc_{arm}", "use", "qc", [f"{o.data_dir}/syn_data/{folder}", "--segmenter",
                                       f"{o.result_dir}/runs/train_seg/{steps['A'].run_name}"], [f"pairs_{arm}", "A"])
        add(arm, "use", "train_seg", args("train_seg", f"data/dataset=[{data}_anno,{data}_syn]",
                                          f"data.ratios=[{o.ratios[0]:g},{o.ratios[1]:g}]",
                                          f"data.dataset.{data}_syn.folder_name={folder}"), [f"pairs_{arm}", f"qc_{arm}"])
    ssl = add("ssl", "train", "pretrain_ssl", args("pretrain_ssl"))
    add("E", "sample", "finetune_ssl",
        args("finetune_ssl", f"pretrained={o.result_dir}/runs/pretrain_ssl/{ssl.run_name}/pretrained_unet.pt"), ["ssl"])
    add("F", "train", "finetune_ssl", args("finetune_ssl", "from_scratch=true"))

    wanted, todo = set(), list(o.arms)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += steps[name].needs
    return sorted((s for s in steps.values() if s.name in wanted), key=lambda s: STAGES.index(s.stage))


def command(step: Step, seed: int | str) -> list[str]:
    """The command a user types for ``step`` (``seed``: a number, or ``"${seed}"`` in a sweep)."""
    args = [a.replace(SEED, str(seed)) for a in step.overrides]
    if step.script == "qc":
        return ["python", "-m", "stedm.qc", *args]
    return ["python", f"{step.script}.py", *args, *([f"seed={seed}"] if seed != "${seed}" else [])]


def sweep_command(step: Step, seeds: int) -> list[str]:
    """The SLURM sweep of ``step`` over every seed (one job per seed)."""
    base = command(step, "${seed}")
    return [*base[:2], "-m", *base[2:], "seed=" + ",".join(str(s) for s in range(seeds))]


def schedule(options: Options, steps: list[Step]) -> list[list[list[str]]]:
    """Groups of commands; group ``i`` belongs to stage ``STAGES[i % len(STAGES)]``. SLURM: one group
    per stage, one sweep per step (run side by side), QC per seed. Local: seed by seed, per seed one
    group per stage, one command per step (run in order), so every finished seed is complete."""
    if options.slurm:
        stages = []
        for stage in STAGES:
            here = [s for s in steps if s.stage == stage]
            cmds = [sweep_command(s, options.seeds) for s in here if s.script != "qc"]
            cmds += [command(s, seed) for s in here if s.script == "qc" for seed in range(options.seeds)]
            stages.append(cmds)
        return stages
    return [[command(s, seed) for s in steps if s.stage == stage] for seed in range(options.seeds) for stage in STAGES]


# -- running -----------------------------------------------------------------------------------
def _start(cmd: list[str], log_path: Path) -> tuple[subprocess.Popen, Any]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    handle = log_path.open("w")
    argv = [sys.executable, *cmd[1:]]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT), handle


def run_schedule(options: Options, stages: list[list[list[str]]], out: Path) -> None:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    count = 0
    for i, cmds in enumerate(stages):
        stage = STAGES[i % len(STAGES)]
        parallel = options.slurm
        running = []
        for cmd in cmds:
            count += 1
            log_path = logs / f"{count:03d}_{stage}_{cmd[1].replace('.py', '').replace('-m', cmd[2])}.log"
            print(f"[{stage}] $ {shlex.join(cmd)}", flush=True)
            running.append((cmd, log_path, time.time(), *_start(cmd, log_path)))
            if not parallel or cmd[1] == "-m":
                _wait(running.pop())
        for item in running:
            _wait(item)


def _wait(item) -> None:
    cmd, log_path, started, process, handle = item
    code = process.wait()
    handle.close()
    if code:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"exit {code}: {shlex.join(cmd)}\n(log {log_path}):\n{tail}")
    print(f"    ok in {time.time() - started:.0f} s (log {log_path})", flush=True)


# -- tabulating ----------------------------------------------------------------------------------
def _files(options: Options, steps: list[Step], seed: int) -> dict[str, Path]:
    """The result files of one seed: each arm's ``metrics_best.json``, each pair folder's QC report."""
    by_name = {s.name: s for s in steps}
    files = {}
    for arm in [a for a in ARMS if a in by_name]:
        step = by_name[arm]
        files[arm] = Path(options.result_dir) / "runs" / step.script / step.run_name.replace(SEED, str(seed)) / "metrics_best.json"
    for arm in ("C", "D"):
        if f"qc_{arm}" in by_name:
            files[f"qc_{arm}"] = Path(by_name[f"qc_{arm}"].overrides[0].replace(SEED, str(seed))) / "qc" / "report.json"
    return {k: p if p.is_absolute() else ROOT / p for k, p in files.items()}


def collect(options: Options, steps: list[Step]) -> dict[str, Any]:
    """Per arm, per finished seed: the best checkpoint's test metrics; per pair folder: the QC numbers.
    A seed with any file missing is left out (named on stdout); none finished is an error."""
    results: dict[str, Any] = {"arms": {}, "qc": {}, "seeds": []}
    missing = {}
    for seed in range(options.seeds):
        files = _files(options, steps, seed)
        absent = [k for k, p in files.items() if not p.is_file()]
        if absent:
            missing[seed] = f"{', '.join(absent)} unfinished (e.g. no {files[absent[0]]})"
            continue
        results["seeds"].append(seed)
        for key, path in files.items():
            data = json.loads(path.read_text())
            if key.startswith("qc_"):
                data = upgrade_qc_report(data)  # reports written before a key moved still tabulate
                results["qc"].setdefault(key[3:], []).append({k: data.get(k) for k, _ in QC_KEYS})
            else:
                results["arms"].setdefault(key, []).append({k: data.get(k) for k, _ in METRICS})
    for seed, why in missing.items():
        print(f"seed {seed} left out of the table: {why}", flush=True)
    if not results["seeds"]:
        raise FileNotFoundError(f"no seed of {options.seeds} has every arm finished (did the runs finish their "
                                f"test?): seed 0: {missing[0]}")
    return results


def _ci(mean: float, half: float, signed: bool = False) -> str:
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + (" ± n/a" if math.isnan(half) else f" ± {half:.3f}")


def table(results: dict[str, Any]) -> str:
    arms = results["arms"]
    values = {a: {k: [r[k] for r in rows] for k, _ in METRICS} for a, rows in arms.items()}
    lines = ["| arm | | seeds | " + " | ".join(f"{t} (mean ± 95% CI)" for _, t in METRICS) + " | per seed (IoU fg) |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for arm, per in values.items():
        lines.append(f"| {arm} | {ARMS[arm]} | {len(arms[arm])} | "
                     + " | ".join(_ci(*mean_ci(per[k])) for k, _ in METRICS)
                     + " | " + " ".join(f"{v:.3f}" for v in per["iou_fg"]) + " |")
    lines += ["", "| paired per seed | " + " | ".join(f"Δ {t} (mean ± 95% CI)" for _, t in METRICS) + " | CI above 0 |",
              "|---|" + "---|" * len(METRICS) + "---|"]
    for a, b in COMPARISONS:
        if a in values and b in values:
            cis = [paired(values[a][k], values[b][k]) for k, _ in METRICS]
            above = "n/a" if math.isnan(cis[0][1]) else ("yes" if cis[0][0] - cis[0][1] > 0 else "no")
            lines.append(f"| {a} − {b} | " + " | ".join(_ci(m, h, True) for m, h in cis) + f" | {above} |")
    if results["qc"]:
        lines += ["", "| pair folder | " + " | ".join(t for _, t in QC_KEYS) + " |", "|---|" + "---|" * len(QC_KEYS)]
        for arm, rows in results["qc"].items():
            for seed, row in zip(results.get("seeds", range(len(rows))), rows):
                cells = ["-" if row[k] is None else f"{row[k]:.3f}" for k, _ in QC_KEYS]
                lines.append(f"| {arm} seed {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global backend state from library code

    arms = list(results["arms"])
    fig = Figure(figsize=(max(5.0, 1.2 * len(arms)) * len(METRICS), 3.8))
    axes = fig.subplots(1, len(METRICS), squeeze=False)
    for ax, (key, title) in zip(axes[0], METRICS):
        for x, arm in enumerate(arms):
            vals = [r[key] for r in results["arms"][arm]]
            mean, half = mean_ci(vals)
            ax.scatter([x] * len(vals), vals, s=18, color="0.5", zorder=2, label="seed" if x == 0 else None)
            ax.errorbar([x + 0.15], [mean], yerr=None if math.isnan(half) else [[half], [half]], fmt="o",
                        color="C0", capsize=4, zorder=3, label="mean ± 95% CI" if x == 0 else None)
        ax.set_xticks(range(len(arms)), [f"{a}\n" + ARMS[a].replace(" + ", " +\n").replace("Diff ", "Diff\n") for a in arms],
                      fontsize=7)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"protocol: {len(next(iter(results['arms'].values())))} seed(s), best checkpoint, test split")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return {}
    options = parse(argv)
    steps = plan(options)
    out = Path(options.result_dir) / "protocol"
    out = out if out.is_absolute() else ROOT / out
    started = time.time()
    if not options.tabulate_only:
        run_schedule(options, schedule(options, steps), out)
    out.mkdir(parents=True, exist_ok=True)
    results = collect(options, steps)
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    picture = figure(results, out / "figure.png")
    print(text)
    print(f"table: {out / 'table.md'}\nfigure: {picture}\nwall time: {time.time() - started:.0f} s")
    results["wall_s"] = time.time() - started
    return results


if __name__ == "__main__":
    main()
