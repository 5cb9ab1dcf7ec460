"""Issue 22, item 3: how much of the oracle's gain LELP recovers with the subclass weight λ (and
with both signs of each direction), paired against KD on the same seeds.

    python benchmarks/quality/run_weight.py --stage digits            # ~2 min on 2 cores
    python benchmarks/quality/run_weight.py --stage fashion --students linear --cache-dir DIR
    python benchmarks/quality/run_weight.py --stage real --dataset fashion-mnist-coarse --fractions 0.01 0.1 1

digits: the toy runner's protocol (docs/results.md, "Digits"), 5 seeds, S = 4, β = 0.25, τ = 1,
LELP at λ ∈ {1, 0.5, 0.25, 0.1, 0} (λ = 0: KD on the pooled C·S-output student, a control).
fashion: ``lelp-fast bench quality --dataset fashion-mnist-mixed``'s protocol at 10 % of the pool with KD, LELP, its variants, the library's choice and the oracle. Each prints per
method the mean test accuracy, the paired difference from KD and the share of the oracle's gain,
and writes results/weight-<stage>.json.
real: any real task's table (the fractions and students of its ``lelp-fast bench quality`` run) with KD,
LELP at λ = 1 and at smaller λ (``--methods``), every cell written to results/weight-<dataset>.json as
soon as it is done. ``--methods KD "LELP library" --library-defaults --tag choice``: the library's choice
(``lelp_fast.tune.search`` with its default grid on the first seed's rows, then trained on every seed).
digits-variants: issue 22's LELP variants (spectral S, GMM, entropy β, annealed β) on digits, at the default
λ, with KD, the default and the oracle (results/variants-digits.json); real tasks: ``--stage real --tag
variants-linear --methods KD LELP "LELP spectral S" ... oracle``; variants-summary prints them all.
digits-choice: the library's choice on digits (``lelp_fast.tune.search``'s default grid; validation: the
training rows no student sees), paired against KD (results/choice-digits.json); choice-summary prints every
results/choice-*.json cell.
summary: every results/weight-*.json as one table: each λ minus KD and λ = 0.1 minus λ = 1, paired, with the
95 % t-interval ("below": the interval lies under 0).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WEIGHTS = (1.0, 0.5, 0.25, 0.1, 0.0)
FASHION_METHODS = ["KD", "LELP", "LELP λ=0.5", "LELP λ=0.25", "LELP λ=0.1", "LELP λ=0 (pooled KD)", "LELP both signs",
                   "LELP library", "oracle"]


def shares(per_seed: dict, kd: str) -> dict:
    """Per method: mean accuracy, paired mean ± sd against KD, seeds won, share of the oracle's gain."""
    base = np.array(per_seed[kd])
    oracle_gain = float(np.mean(np.array(per_seed["oracle"]) - base))
    out = {}
    for method, accs in per_seed.items():
        diff = np.array(accs) - base
        out[method] = {"mean": float(np.mean(accs)), "diff": float(diff.mean()),
                       "diff_sd": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0, "wins": int((diff > 0).sum()),
                       "share": float(diff.mean()) / oracle_gain if oracle_gain > 0 else float("nan")}
    return out


def print_table(name: str, table: dict) -> None:
    print(f"\n{name}\n| method | test accuracy (%) | minus KD (points, paired) | wins | oracle share |")
    print("|---|---|---|---|---|")
    for method, s in table.items():
        print(f"| {method} | {100 * s['mean']:.2f} | {100 * s['diff']:+.2f} ± {100 * s['diff_sd']:.2f} | {s['wins']} | "
              f"{100 * s['share']:.0f} % |", flush=True)


def run_digits() -> dict:
    from lelp_fast.quality import QualityConfig, run_quality

    data = {}
    for task in ("digits-parity", "digits-low"):
        for hidden in (0, 32):
            base = QualityConfig(dataset=task, seeds=5, n_teachers=1, validation_fraction=0.0, student_hidden=hidden,
                                 beta=0.25)
            fixed = run_quality(base, ["vanilla KD", "oracle"], progress=False)["per_seed"]
            per_seed = {m: [seed[m]["accuracy"] for seed in fixed] for m in ("vanilla KD", "oracle")}
            for weight in WEIGHTS:
                runs = run_quality(replace(base, subclass_weight=weight), ["LELP"], progress=False)["per_seed"]
                per_seed[f"LELP λ={weight}"] = [seed["LELP"]["accuracy"] for seed in runs]
            name = f"{task} {'linear' if hidden == 0 else 'mlp'}"
            data[name] = per_seed
            print_table(name, shares(per_seed, "vanilla KD"))
    return data


def run_digits_variants(methods=None) -> dict:
    """Issue 22's LELP variants (lelp_fast.methods.subclass_variants) on the digits protocol, at the
    library's default λ, with KD, the default LELP and the oracle on the same seeds (or ``methods``)."""
    from lelp_fast.methods.subclass_variants import VARIANTS
    from lelp_fast.quality import QualityConfig, run_quality

    methods = methods or ["vanilla KD", "LELP", *VARIANTS, "oracle"]
    data = {}
    for task in ("digits-parity", "digits-low"):
        for hidden in (0, 32):
            cfg = QualityConfig(dataset=task, seeds=5, n_teachers=1, validation_fraction=0.0, student_hidden=hidden,
                                beta=0.25, subclass_weight=None)
            runs = run_quality(cfg, methods, progress=False)["per_seed"]
            name = f"{task} {'linear' if hidden == 0 else 'mlp'}"
            data[name] = {m: [seed[m]["accuracy"] for seed in runs] for m in methods}
            print_table(name, shares(data[name], "vanilla KD"))
    return data


def run_digits_choice() -> dict:
    """The library's choice on digits: ``lelp_fast.tune.search`` with its default grid on seed 0's student rows,
    validated on the training rows that no student sees (the teacher trained on them; the students' rows, the
    teacher and the fits are those of the other columns), then trained on every seed with the digits protocol,
    paired against vanilla KD (τ = 1) on the same seeds."""
    from lelp_fast.quality import QualityConfig, run_quality
    from lelp_fast.quality.models import MLP
    from lelp_fast.quality.runner import _Context
    import torch

    from lelp_fast.tune import ProxySettings, TeacherOutputs, TuneGrid, search

    torch.set_num_threads(1)  # tiny full-batch steps: a second thread only waits on a shared machine
    data = {}
    for task in ("digits-parity", "digits-low"):
        for hidden in (0, 32):
            base = QualityConfig(dataset=task, seeds=5, n_teachers=1, validation_fraction=0.0, student_hidden=hidden,
                                 beta=0.25)
            ctx = _Context(0, base)
            rows, val = ctx.student_rows, ctx.train[len(ctx.student_rows):]
            head = ctx.teacher.head
            teacher = TeacherOutputs(ctx.emb[0][rows], ctx.logits[0][rows], ctx.y[rows],
                                     (head.weight.detach(), head.bias.detach()))
            settings = ProxySettings(lr=1e-2, weight_decay=1e-4, batch_size=len(rows))  # the protocol's full batch
            # the finals train the protocol's budget, scored at the last step, as its students are kept
            grid = TuneGrid(final_steps=base.student_epochs, keep="last")
            best = search(teacher, (ctx.x[rows], ctx.y[rows]), (ctx.x[val], ctx.y[val]),
                          lambda k: MLP(ctx.x.shape[1], hidden, k), settings, grid, log=lambda _: None)
            choice, reason = best["best"], best["decision"]["reason"]
            if choice["subclasses"] == 1:
                cfg, method = replace(base, tau=choice["tau"]), "vanilla KD"
            else:
                cfg, method = replace(base, n_subclasses=choice["subclasses"], beta=choice["beta"],
                                      tau=choice["tau"], subclass_weight=choice["subclass_weight"]), "LELP"
            kd = run_quality(base, ["vanilla KD"], progress=False)["per_seed"]
            chosen = run_quality(cfg, [method], progress=False)["per_seed"]
            per_seed = {"KD": [r["vanilla KD"]["accuracy"] for r in kd],
                        "LELP library": [r[method]["accuracy"] for r in chosen]}
            name = f"{task} {'linear' if hidden == 0 else 'mlp'}"
            data[name] = {"per_seed": per_seed, "library": {**{k: choice[k] for k in ("subclasses", "beta", "tau",
                                                                                     "subclass_weight")},
                                                            "reason": reason, "validation_rows": len(val),
                                                            "lelp": best["lelp"]}}
            print(f"{name}: library {data[name]['library']}")
            print_table(name, {m: {**v, "share": float("nan")} for m, v in _paired(per_seed).items()})
    return data


def variants_summary() -> None:
    """Every results/variants-*.json cell as two tables: each method minus KD (mean ± sd, seeds won) with
    the oracle's share for the default and the GMM; each variant minus the default LELP, with its paired
    95 % t-interval (bold where it excludes 0)."""
    import glob

    from lelp_fast.methods.subclass_variants import VARIANTS
    from lelp_fast.paired import paired_interval

    # Per cell and method: (its accuracies, KD's and the default's from the same run). A later file (the
    # tied GMM's, variants-tied-*) adds methods; its KD must equal the earlier run's to borrow its default.
    cells = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "variants-*.json"))):
        with open(path) as f:
            data = json.load(f)
        for name, cell in data.get("cells", data).items():
            m = dict(cell.get("per_seed", cell))
            m["KD"] = m.pop("vanilla KD", None) or m["KD"]
            earlier = cells.setdefault(name, {})
            same_students = "KD" in earlier and earlier["KD"][0] == m["KD"]
            if earlier and not same_students:
                print(f"note: {name}: KD in {os.path.basename(path)} differs from the earlier run's by up to "
                      f"{100 * max(abs(a - b) for a, b in zip(m['KD'], earlier['KD'][0])):.2f} points on a seed "
                      "(thread order); its methods are paired with its own KD and default only")
            lelp = m.get("LELP") or (earlier["LELP"][0] if same_students and "LELP" in earlier else None)
            for key, values in m.items():
                if key not in earlier or key not in ("KD", "LELP", "oracle"):
                    earlier[key] = (values, m["KD"], lelp)
    cells = list(cells.items())

    def diff(a, b):  # "below": the paired 95 % interval lies under 0 (below KD beyond noise)
        st = paired_interval(a, b)
        below = " **below**" if st["interval"][1] < 0 else ""
        return f"{100 * st['mean']:+.2f} ± {100 * st['sd']:.2f} ({st['wins']}/{st['seeds']}){below}"

    def interval(a, b):
        st = paired_interval(a, b)
        lo, hi = st["interval"]
        text = f"{100 * st['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
        return f"**{text}**" if lo > 0 or hi < 0 else text

    def share(m, method):
        gain = float(np.mean(m["oracle"][0]) - np.mean(m["KD"][0])) if "oracle" in m else 0.0
        if gain < 0.03 or method not in m:  # the share is quoted where the oracle is worth >= 3 points
            return "—"
        values, kd, _ = m[method]
        # + 1e-9: 87.5 % prints as 88 % (as docs/results.md rounds it), not as 0.87499999... -> 87 %
        return f"{round(100 * float(np.mean(values) - np.mean(kd)) / gain + 1e-9)} %"

    methods = ["LELP", *VARIANTS, "oracle"]
    print("| cell | KD (%) | " + " | ".join(methods) + " | share: default, GMM, GMM full |")
    print("|---" * (len(methods) + 3) + "|")
    for name, m in cells:
        cols = [diff(m[k][0], m[k][1]) if k in m else "not run" for k in methods]
        print(f"| {name} | {100 * np.mean(m['KD'][0]):.2f} | " + " | ".join(cols)
              + f" | {share(m, 'LELP')}, {share(m, 'LELP GMM')}, {share(m, 'LELP GMM full')} |")
    print("\n| cell | " + " | ".join(f"{v} − default" for v in VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 1) + "|")
    for name, m in cells:
        print(f"| {name} | " + " | ".join(interval(m[v][0], m[v][2]) if v in m and m[v][2] else "not run"
                                         for v in VARIANTS) + " |")


def variants_diagnostics(cache_dir) -> None:
    """What each variant chose, fitted as the runs fit it: per class S_c (spectral), β_c (entropy) and the
    mean normalised entropy of the GMM's split over the class's own rows; the digits per seed."""
    import torch

    from lelp_fast.methods.subclass_variants import SubclassVariant, split_entropy
    from lelp_fast.quality import REAL_TASKS
    from lelp_fast.quality.runner import QualityConfig, _Context

    def line(name, h, y, c, w, seed):
        spectral, gmm, ent = (SubclassVariant(v, h, y, c, 4, w, seed=seed) for v in
                              ("LELP spectral S", "LELP GMM", "LELP entropy β"))
        def own(u, beta):  # mean normalised split entropy of each class over its own rows
            e = split_entropy(u, 4, beta)
            return [round(float(e[y == k, k].mean()), 2) for k in range(c)]

        print(f"| {name} | {spectral.coordinates.subclass_counts.tolist()} | "
              f"{[round(float(b), 3) for b in ent.betas]} | {own(gmm.project(h), 1.0)} | {own(ent.project(h), 0.25)} |")

    print("| task | S_c (spectral, share 0.8, at most 8) | β_c (entropy 0.35) | GMM (tied) split entropy / log S | "
          "default's (β = 0.25) |")
    print("|---|---|---|---|---|")
    for dataset in ("fashion-mnist-mixed", "fashion-mnist-coarse", "fashion-mnist-parity", "trump-tweets"):
        t = REAL_TASKS[dataset](cache_dir) if cache_dir else REAL_TASKS[dataset]()
        line(dataset, t.h[t.train], t.y[t.train], t.num_classes, t.head["head_weight"], 0)
    for task in ("digits-parity", "digits-low"):
        for seed in range(5):
            ctx = _Context(seed, QualityConfig(dataset=task, n_teachers=1, validation_fraction=0.0))
            line(f"{task} seed {seed}", ctx.emb[0][ctx.train], ctx.y[ctx.train], ctx.num_classes,
                 ctx.teachers[0].head.weight.detach(), seed)


def run_fashion(students, fraction: float, seeds: int, cache_dir) -> dict:
    from lelp_fast.quality import real_config, run_real_quality

    overrides = {"cache_dir": cache_dir} if cache_dir else {}
    cfg = real_config("fashion-mnist-mixed", students=tuple(students), fractions=(fraction,), seeds=seeds, **overrides)
    result = run_real_quality(cfg, FASHION_METHODS, progress=True)
    data = {}
    for cell in result["cells"]:
        name = f"fashion-mnist-mixed {cell['student']} {cell['fraction']:g} ({cell['rows']} rows)"
        data[name] = {"per_seed": cell["per_seed"], "tuned": cell["tuned"], "seconds": cell["seconds"]}
        print(f"teacher {100 * result['teacher_accuracy']:.2f} %; KD tau {cell['tuned']['kd_tau']}; "
              f"library: {cell['tuned'].get('library')}")
        print_table(name, shares(cell["per_seed"], "KD"))
    return data


REAL_WEIGHT_METHODS = ["KD", "LELP λ=1", "LELP λ=0.1", "LELP λ=0.25"]


def run_real(dataset: str, students, fractions, seeds: int, methods, cache_dir, out_path: str, beta=None,
             library_defaults: bool = False) -> dict:
    """One process, one teacher (trained with torch's threads, then students on one thread), cell by cell."""
    import time

    import torch

    from lelp_fast.quality import REAL_TASKS, real_config
    from lelp_fast.quality.real_runner import _fits, run_cell

    overrides = {"cache_dir": cache_dir} if cache_dir else {}
    cfg = real_config(dataset, students=tuple(students), fractions=tuple(fractions), seeds=seeds, beta=beta,
                      library_defaults=library_defaults, **overrides)
    start = time.perf_counter()
    task = REAL_TASKS[dataset](cfg.cache_dir)
    methods = [m for m in methods if not (m == "oracle" and task.sub is None)]
    print(f"{dataset}: teacher {100 * task.teacher_accuracy:.2f} % ({time.perf_counter() - start:.0f} s to load or "
          f"train)", flush=True)
    torch.set_num_threads(1)
    fits = _fits(task, cfg, methods)
    data = {"dataset": dataset, "teacher_accuracy": task.teacher_accuracy, "seeds": seeds, "methods": methods,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}, "cells": {}}
    for kind in students:
        for fraction in fractions:
            cell = run_cell(task, kind, fraction, cfg, methods, fits, progress=True)
            name = f"{dataset} {kind} {fraction:g} ({cell['rows']} rows)"
            data["cells"][name] = {"per_seed": cell["per_seed"], "tuned": cell["tuned"], "seconds": cell["seconds"]}
            with open(out_path, "w") as f:
                json.dump(data, f, indent=1)
            library = f"; library: {cell['tuned']['library']['reason']}" if "library" in cell["tuned"] else ""
            print(f"KD tau {cell['tuned']['kd_tau']}{library}; {cell['seconds']:.0f} s")
            if "KD" in methods:  # the paired table needs its baseline
                print_table(name, shares(cell["per_seed"], "KD") if "oracle" in methods else
                            {m: {**v, "share": float("nan")} for m, v in _paired(cell["per_seed"]).items()})
    return data


def _paired(per_seed: dict) -> dict:
    base = np.array(per_seed["KD"])
    out = {}
    for method, accs in per_seed.items():
        diff = np.array(accs) - base
        out[method] = {"mean": float(np.mean(accs)), "diff": float(diff.mean()),
                       "diff_sd": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0, "wins": int((diff > 0).sum())}
    return out


def _cells():
    """(cell name, {"KD", "λ=1", "λ=0.25", "λ=0.1", "oracle": per-seed accuracies}) from every results/weight-*.json."""
    import glob

    rename = {"vanilla KD": "KD", "KD": "KD", "oracle": "oracle", "LELP λ=1.0": "λ=1", "LELP λ=1": "λ=1",
              "LELP": "λ=1", "LELP λ=0.25": "λ=0.25", "LELP λ=0.1": "λ=0.1"}
    for path in sorted(glob.glob(os.path.join(RESULTS, "weight-*.json"))):
        with open(path) as f:
            data = json.load(f)
        cells = data.get("cells", data)
        for name, cell in cells.items():
            per_seed = cell.get("per_seed", cell)
            yield name, {rename[m]: v for m, v in per_seed.items() if m in rename}


def summary() -> None:
    """Per cell: each λ minus KD and λ = 0.1 minus λ = 1, paired (mean ± sd, 95 % t-interval, wins), and
    whether the paired interval lies below 0 ("below KD beyond noise")."""
    from lelp_fast.paired import paired_interval

    def text(a, b):
        st = paired_interval(a, b)
        lo, hi = st["interval"]
        flag = " **below**" if hi < 0 else ""
        return (f"{100 * st['mean']:+.2f} ± {100 * st['sd']:.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                f"({st['wins']}/{st['seeds']}){flag}")

    print("| cell | KD (%) | λ = 1 − KD | λ = 0.25 − KD | λ = 0.1 − KD | λ = 0.1 − λ = 1 | oracle − KD |")
    print("|---|---|---|---|---|---|---|")
    for name, m in _cells():
        kd = m["KD"]
        cols = [text(m[k], kd) if k in m else "—" for k in ("λ=1", "λ=0.25", "λ=0.1")]
        cols.append(text(m["λ=0.1"], m["λ=1"]) if "λ=0.1" in m and "λ=1" in m else "—")
        cols.append(text(m["oracle"], kd) if "oracle" in m else "—")
        print(f"| {name} | {100 * np.mean(kd):.2f} | " + " | ".join(cols) + " |")


def choice_summary() -> None:
    """Every results/choice-*.json cell: the library's choice minus KD on the same seeds (mean ± sd, seeds won,
    95 % paired t-interval; "below": it lies under 0) and what the tuner chose on the first seed's rows."""
    import glob

    from lelp_fast.paired import paired_interval

    print("| cell | KD (%), τ | library − KD | 95 % interval | choice | tuner's validation gain (LELP − KD) |")
    print("|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(RESULTS, "choice-*.json"))):
        if not os.path.getsize(path):  # a run still going (digits-choice writes at the end)
            continue
        with open(path) as f:
            data = json.load(f)
        for name, cell in data.get("cells", data).items():
            m, lib = cell["per_seed"], cell.get("library") or cell["tuned"]["library"]
            st = paired_interval(m["LELP library"], m["KD"])
            lo, hi = st["interval"]
            point = lib.get("lelp") or lib  # the LELP point the tuner weighed against KD (digits: not kept)
            lelp = (f"S = {point['subclasses']}, β = {point['beta']:g}, τ = {point['tau']:g}, "
                    f"λ = {point['subclass_weight']:g}" if point["subclasses"] > 1 else None)
            choice = (lelp if lib["subclasses"] > 1 else
                      f"KD, τ = {lib['tau']:g}" + (f" (against {lelp})" if lelp else ""))
            reason = lib["reason"]
            gain = reason.split("validation ", 1)[1].split(":")[0] if "validation " in reason else reason
            below = " **below**" if hi < 0 else ""
            kd_tau = cell.get("tuned", {}).get("kd_tau", 1.0)  # digits: vanilla KD at τ = 1
            print(f"| {name} | {100 * np.mean(m['KD']):.2f}, {kd_tau:g} | "
                  f"{100 * st['mean']:+.2f} ± {100 * st['sd']:.2f} ({st['wins']}/{st['seeds']}) | {100 * lo:+.2f} to {100 * hi:+.2f}{below} | {choice} | {gain} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("digits", "digits-variants", "digits-choice", "fashion", "real",
                                            "summary", "variants-summary", "choice-summary"), required=True)
    parser.add_argument("--dataset", default="fashion-mnist-coarse")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--methods", nargs="+", help="stage real: default REAL_WEIGHT_METHODS; digits-variants: "
                        "default KD, LELP, every variant and the oracle")
    parser.add_argument("--students", nargs="+", default=["linear"])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cache-dir")
    parser.add_argument("--tag", help="stage real writes results/<tag>-<dataset>.json (default tag: weight), "
                        "digits-variants results/<tag>-digits.json (default: variants)")
    parser.add_argument("--beta", type=float, help="stage real: the LELP rows' β (default: the library's)")
    parser.add_argument("--library-defaults", action="store_true",
                        help="stage real: 'LELP library' runs lelp_fast.tune.search with its default grid")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    if args.stage == "summary":
        summary()
        return
    if args.stage == "choice-summary":
        choice_summary()
        return
    if args.stage == "variants-summary":
        variants_summary()
        variants_diagnostics(args.cache_dir)
        return
    if args.stage == "digits-variants":  # every variant, or --methods (KD is "vanilla KD" here) into --tag's file
        tag = args.tag or "variants"
        data = run_digits_variants(args.methods)  # before the file is opened: a failed run leaves the old one
        with open(os.path.join(RESULTS, f"{tag}-digits.json"), "w") as f:
            json.dump(data, f, indent=1)
        return
    if args.stage == "digits-choice":
        data = run_digits_choice()
        with open(os.path.join(RESULTS, "choice-digits.json"), "w") as f:
            json.dump(data, f, indent=1)
        return
    if args.stage == "real":
        run_real(args.dataset, args.students, args.fractions, args.seeds, args.methods or REAL_WEIGHT_METHODS,
                 args.cache_dir, os.path.join(RESULTS, f"{args.tag or 'weight'}-{args.dataset}.json"), args.beta,
                 args.library_defaults)
        return
    data = run_digits() if args.stage == "digits" else run_fashion(args.students, args.fraction, args.seeds,
                                                                    args.cache_dir)
    os.makedirs(RESULTS, exist_ok=True)
    suffix = args.stage if args.stage == "digits" else f"fashion-{'-'.join(args.students)}"
    with open(os.path.join(RESULTS, f"weight-{suffix}.json"), "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
