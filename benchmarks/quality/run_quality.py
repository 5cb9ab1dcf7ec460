"""The quality evidence of docs/results.md: tables for every task, and the two sweeps as plots.

Run: python benchmarks/quality/run_quality.py [--seeds 5] [--out benchmarks/quality/results]

1. ``lelp-fast bench quality`` on every task (all methods, 5 seeds) -> <task>.json and <task>.md.
2. Accuracy vs the fraction of training rows the student distils from (hard labels, vanilla KD,
   LELP; paper Fig. 6 left) -> docs/quality_fraction.png.
3. LELP accuracy vs S and vs β (paper Fig. 5) -> docs/quality_s_beta.png.
One teacher in the sweeps (the multi-teacher rows are in the tables).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

from lelp_fast.quality import DATASETS, QualityConfig, format_markdown, run_quality

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRACTIONS = [0.05, 0.1, 0.25, 0.5, 1.0]
SUBCLASSES = [1, 2, 4, 8, 16]
BETAS = [0.25, 0.5, 1.0, 2.0, 4.0]
SWEEP_METHODS = ["hard labels", "vanilla KD", "LELP"]


def _row(result, method):
    return next(r for r in result["rows"] if r["method"] == method)


def sweeps(seeds: int, out: str) -> dict:
    data = {}
    for task in ("digits-parity", "hierarchical"):
        base = QualityConfig(dataset=task, seeds=seeds, n_teachers=1)
        frac = {}
        for f in FRACTIONS:
            r = run_quality(replace(base, student_fraction=f), SWEEP_METHODS, progress=False)
            frac[f] = {m: (_row(r, m)["accuracy_mean"], _row(r, m)["accuracy_std"]) for m in SWEEP_METHODS}
            print(task, "fraction", f, frac[f], flush=True)
        by_s = {}
        for s in SUBCLASSES:
            r = run_quality(replace(base, n_subclasses=s), ["LELP"], progress=False)
            by_s[s] = (_row(r, "LELP")["accuracy_mean"], _row(r, "LELP")["accuracy_std"])
        by_beta = {}
        for b in BETAS:
            r = run_quality(replace(base, beta=b), ["LELP"], progress=False)
            by_beta[b] = (_row(r, "LELP")["accuracy_mean"], _row(r, "LELP")["accuracy_std"])
        kd = run_quality(base, ["vanilla KD"], progress=False)
        data[task] = {"fraction": frac, "S": by_s, "beta": by_beta,
                      "vanilla KD": (_row(kd, "vanilla KD")["accuracy_mean"], _row(kd, "vanilla KD")["accuracy_std"])}
        print(task, "S", by_s, "beta", by_beta, flush=True)
    with open(os.path.join(out, "sweeps.json"), "w") as f:
        json.dump(data, f, indent=1)
    return data


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 3.6))
    for ax, (task, d) in zip(axes, data.items()):
        fr = sorted(d["fraction"], key=float)
        for m in SWEEP_METHODS:
            mean = [100 * d["fraction"][f][m][0] for f in fr]
            std = [100 * d["fraction"][f][m][1] for f in fr]
            ax.errorbar([float(f) for f in fr], mean, yerr=std, marker="o", capsize=3, label=m)
        ax.set(xscale="log", xlabel="fraction of training rows distilled from", ylabel="test accuracy (%)", title=task)
        ax.set_xticks([float(f) for f in fr], [f"{float(f):g}" for f in fr])
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", "quality_fraction.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for task, d in data.items():
        for ax, key, label in ((axes[0], "S", "S (pseudo-subclasses per class)"), (axes[1], "beta", "β")):
            xs = sorted(d[key], key=float)
            line = ax.errorbar([float(v) for v in xs], [100 * d[key][v][0] for v in xs],
                               yerr=[100 * d[key][v][1] for v in xs], marker="o", capsize=3, label=f"LELP, {task}")
            ax.axhline(100 * d["vanilla KD"][0], ls="--", color=line[0].get_color(), label=f"vanilla KD, {task}")
            ax.set(xscale="log", xlabel=label, ylabel="test accuracy (%)")
            ax.set_xticks([float(v) for v in xs], [f"{float(v):g}" for v in xs])
            ax.minorticks_off()
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", "quality_s_beta.png"), dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "quality", "results"))
    parser.add_argument("--skip-tables", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plots from <out>/sweeps.json")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.plot_only:
        with open(os.path.join(args.out, "sweeps.json")) as f:
            plot(json.load(f))
        return
    if not args.skip_tables:
        for task in DATASETS:
            result = run_quality(QualityConfig(dataset=task, seeds=args.seeds), progress=False)
            with open(os.path.join(args.out, f"{task}.json"), "w") as f:
                json.dump(result, f, indent=1)
            with open(os.path.join(args.out, f"{task}.md"), "w") as f:
                f.write(format_markdown(result) + "\n")
            print(format_markdown(result), flush=True)
    plot(sweeps(args.seeds, args.out))


if __name__ == "__main__":
    main()
