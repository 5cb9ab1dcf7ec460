"""The real-data evidence of docs/results.md: the β / S sweeps, the benchmark tables and their plots.

Run: python benchmarks/quality/run_real.py [--stage sweeps bench plots] [--tasks ...] [--mode cpu]

1. sweeps: LELP's validation / test accuracy against β and S, and the targets' subclass entropy,
   for the linear and the MLP student on 10 % of each task's pool (all of the tweets' pool) -> results/real-sweeps.json.
2. digits: the toy runner's digits tasks with a linear and an MLP student, LELP at each β, KD and
   the oracle -> results/digits-beta.json.
3. bench: ``lelp-fast bench quality`` on each task (every method, 5 seeds) -> results/<task>.json, .md.
4. plots: docs/quality_real_beta.png (sweeps) and docs/quality_real_fraction.png (bench).
"""

from __future__ import annotations

import argparse
import json
import os

from lelp_fast.quality import REAL_TASKS, format_real_markdown, real_config, run_real_quality
from lelp_fast.quality.real_runner import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "quality", "results")
BETAS = [0.05, 0.1, 0.25, 0.5, 1.0]
SUBCLASSES = [1, 2, 4, 8, 16]
SWEEP_FRACTION = {"trump-tweets": 1.0}  # its pool is small (4.7 k rows); the others use 0.1


def run_sweeps(tasks, mode: str) -> None:
    path = os.path.join(RESULTS, "real-sweeps.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    for task in tasks:
        for student in ("linear", "mlp"):
            cfg = real_config(task, mode, beta=0.25)  # the S curve at β = 0.25
            data[f"{task} {student}"] = sweep(cfg, student, SWEEP_FRACTION.get(task, 0.1), BETAS, SUBCLASSES)
            with open(path, "w") as f:
                json.dump(data, f, indent=1)


def run_digits() -> None:
    """The toy runner on digits (MLP teacher, 25 % of the rows, full batch) with a linear and an MLP
    student: KD, the oracle, and LELP at each β (S = 4), 5 seeds -> results/digits-beta.json."""
    from dataclasses import replace

    from lelp_fast.quality import QualityConfig, run_quality

    data = {}
    for task in ("digits-parity", "digits-low"):
        for hidden in (0, 32):
            base = QualityConfig(dataset=task, seeds=5, n_teachers=1, validation_fraction=0.0, student_hidden=hidden)
            fixed = run_quality(base, ["hard labels", "vanilla KD", "oracle"], progress=False)["per_seed"]
            per_seed = {m: [seed[m]["accuracy"] for seed in fixed] for m in ("hard labels", "vanilla KD", "oracle")}
            for beta in BETAS:
                runs = run_quality(replace(base, beta=beta), ["LELP"], progress=False)["per_seed"]
                per_seed[f"LELP beta={beta}"] = [seed["LELP"]["accuracy"] for seed in runs]
            data[f"{task} {'linear' if hidden == 0 else 'mlp'}"] = per_seed
            print(task, hidden, {k: round(100 * sum(v) / len(v), 2) for k, v in per_seed.items()}, flush=True)
    with open(os.path.join(RESULTS, "digits-beta.json"), "w") as f:
        json.dump(data, f, indent=1)


def beta_choice() -> str:
    """Markdown: LELP minus KD (test, S = 4, mean over seeds) at each β for every sweep (real data
    and digits), and its mean over the sweeps, the number the default β maximises."""
    import numpy as np

    rows = {}
    for name, result in json.load(open(os.path.join(RESULTS, "real-sweeps.json"))).items():
        kd = np.array(result["curves"]["KD"]["test"])
        rows[name] = {float(b): float((np.array(v["test"]) - kd).mean()) for b, v in result["curves"]["beta"].items()}
    for name, per_seed in json.load(open(os.path.join(RESULTS, "digits-beta.json"))).items():
        kd = np.array(per_seed["vanilla KD"])
        rows[name] = {float(k.split("=")[1]): float((np.array(v) - kd).mean()) for k, v in per_seed.items()
                      if k.startswith("LELP beta=")}
    betas = sorted(next(iter(rows.values())))
    lines = ["| sweep | " + " | ".join(f"β = {b:g}" for b in betas) + " |", "|---" * (len(betas) + 1) + "|"]
    for name, by_beta in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * by_beta[b]:+.2f}" for b in betas) + " |")
    means = [100 * np.mean([r[b] for r in rows.values()]) for b in betas]
    lines.append("| **mean** | " + " | ".join(f"**{m:+.2f}**" for m in means) + " |")
    return "\n".join(lines)


def compact_table(task: str) -> str:
    """Markdown: one column per (student, fraction); tuned KD's test accuracy, then every other
    method's paired difference from it (points, mean ± sd over seeds, wins)."""
    result = json.load(open(os.path.join(RESULTS, f"{task}.json")))
    cells = result["cells"]
    head = [f"{c['student']}, {c['fraction']:g} ({c['rows']} rows)" for c in cells]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(cells) + 1) + "|",
             "| KD, tuned τ (test %) | " + " | ".join(
                 f"{100 * c['summary']['KD']['mean']:.2f} ± {100 * c['summary']['KD']['std']:.2f} "
                 f"(τ={c['tuned']['kd_tau']:g})"
                 for c in cells) + " |"]
    for method in cells[0]["summary"]:
        if method != "KD":
            lines.append(f"| {method} | " + " | ".join(
                f"{100 * c['summary'][method]['diff_mean']:+.2f} ± {100 * c['summary'][method]['diff_std']:.2f} "
                f"({c['summary'][method]['wins']}/{c['summary'][method]['seeds']})" for c in cells) + " |")
    lines.append("| LELP tuned: S, β | " + " | ".join(f"{c['tuned']['lelp'][0]}, {c['tuned']['lelp'][1]:g}"
                                                     for c in cells) + " |")
    return "\n".join(lines)


def run_bench(tasks, mode: str) -> None:
    for task in tasks:
        fractions = (0.1, 1.0) if task == "trump-tweets" else (0.01, 0.1, 1.0)
        result = run_real_quality(real_config(task, mode, fractions=fractions))
        with open(os.path.join(RESULTS, f"{task}.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(RESULTS, f"{task}.md"), "w") as f:
            f.write(format_real_markdown(result) + "\n")


def _mean(values):
    return 100 * sum(values) / len(values)


def sweep_tables() -> str:
    """Markdown: per sweep, LELP minus tuned KD (test, paired, mean ± sd over seeds) at each β and
    S, the validation accuracy that a tuner would see, and the targets' subclass entropy."""
    import numpy as np

    sweeps = json.load(open(os.path.join(RESULTS, "real-sweeps.json")))
    lines = []
    for name, result in sweeps.items():
        c = result["curves"]
        kd_test, kd_val = np.array(c["KD"]["test"]), np.array(c["KD"]["val"])
        lines += [f"**{name}** ({result['fraction']:g} of the pool, {result['seeds']} seeds; tuned KD tau="
                  f"{c['KD']['tau']}: test {100 * kd_test.mean():.2f}, validation {100 * kd_val.mean():.2f})", "",
                  "| setting | subclass entropy | LELP − KD, test (points) | wins | LELP − KD, validation |",
                  "|---|---|---|---|---|"]
        for axis in ("beta", "S"):
            for key in sorted(c[axis], key=float):
                test, val = np.array(c[axis][key]["test"]) - kd_test, np.array(c[axis][key]["val"]) - kd_val
                label = f"β = {key}, S = {result['S']}" if axis == "beta" else f"S = {key}, β = 0.25"
                entropy = f"{c['entropy'][key]:.2f}" if axis == "beta" else ""
                lines.append(f"| {label} | {entropy} | {100 * test.mean():+.2f} ± {100 * test.std(ddof=1):.2f} | "
                             f"{int((test > 0).sum())}/{len(test)} | {100 * val.mean():+.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(tasks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = json.load(open(os.path.join(RESULTS, "real-sweeps.json")))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for task in sweeps:
        curves = sweeps[task]["curves"]
        kd = _mean(curves["KD"]["test"])
        betas = sorted(curves["beta"], key=float)
        gains = [_mean(curves["beta"][b]["test"]) - kd for b in betas]
        axes[0].plot([float(b) for b in betas], gains, "o-", label=task)
        sizes = sorted(curves["S"], key=int)
        axes[1].plot([int(s) for s in sizes], [_mean(curves["S"][s]["test"]) - kd for s in sizes], "o-", label=task)
    axes[0].set(xscale="log", xlabel="β (S = 4)", ylabel="LELP − tuned KD, test (points)")
    axes[1].set(xscale="log", xlabel="S (β = 0.25)", ylabel="LELP − tuned KD, test (points)")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", "quality_real_beta.png"), dpi=100)
    plt.close(fig)

    benches = {t: json.load(open(os.path.join(RESULTS, f"{t}.json"))) for t in tasks
               if os.path.exists(os.path.join(RESULTS, f"{t}.json"))}
    fig, axes = plt.subplots(1, len(benches), figsize=(5 * len(benches), 3.6), squeeze=False)
    for ax, (task, result) in zip(axes[0], benches.items()):
        for student in dict.fromkeys(c["student"] for c in result["cells"]):
            cells = [c for c in result["cells"] if c["student"] == student]
            for method, style in (("LELP tuned", "o-"), ("oracle", "s--")):
                if method in cells[0]["summary"]:
                    ax.plot([c["fraction"] for c in cells], [100 * c["summary"][method]["diff_mean"] for c in cells],
                            style, label=f"{student}: {method}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="fraction of the training pool", ylabel="minus tuned KD (points)", title=task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", "quality_real_fraction.png"), dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", nargs="+", choices=("sweeps", "digits", "bench", "plots"),
                        default=["sweeps", "digits", "bench", "plots"])
    parser.add_argument("--tasks", nargs="+", choices=tuple(REAL_TASKS), default=list(REAL_TASKS))
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    if "sweeps" in args.stage:
        run_sweeps(args.tasks, args.mode)
    if "digits" in args.stage:
        run_digits()
    if "bench" in args.stage:
        run_bench(args.tasks, args.mode)
    if "plots" in args.stage:
        plot(args.tasks)
        with open(os.path.join(RESULTS, "real-sweeps.md"), "w") as f:
            f.write(sweep_tables() + "\n" + beta_choice() + "\n")


if __name__ == "__main__":
    main()
