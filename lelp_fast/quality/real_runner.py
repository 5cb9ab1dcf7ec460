"""The real-data quality benchmark (``lelp-fast bench quality --dataset fashion-mnist-coarse ...``).

For each student kind and distillation fraction (a "cell"), every method trains the same student
(same initialisation per seed) on the same random fraction of the training pool, with minibatch
Adam for a fixed number of steps, and is scored by test accuracy. KD's τ and LELP's (S, β, τ) are
tuned on the validation rows with the first seed and kept for the others; nothing is tuned on the
test rows. Each method is compared with tuned KD on the same seed (paired differences).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..loss import LELPLoss
from ..methods import AnnealingKD, KDLoss, KMeansSubclasses, RandomProjectionSubclasses, oracle_coordinates
from ..methods import subclass_log_targets
from ..methods.subclass_variants import VARIANTS, SubclassVariant, both_signs_map
from ..projector import DEFAULT_BETA, LELPProjector
from ..reference import class_logits, resolve_subclass_weight
from .real_data import DEFAULT_CACHE, REAL_TASKS, RealTask
from .runner import checked_methods

REAL_METHODS = ("hard labels", "KD", "annealing KD", "LELP", "LELP tuned", "LELP library", "LELP λ=1", "LELP λ=0.5",
                "LELP λ=0.25", "LELP λ=0.1", "LELP λ=0 (pooled KD)", "LELP both signs", "random projections",
                "k-means", "oracle")
# "LELP" trains at the library's default λ (cfg.subclass_weight None: reference.DEFAULT_SUBCLASS_WEIGHT);
# the other subclass rows (tuned, ablations, oracle) at λ = 1, as their tables were measured.
# "LELP λ=w": the default targets with the subclass part of the KL weighted by w (1: LELP). λ = 0 is
# KD's class-level loss on the C·S-output student pooled by logsumexp: the control that separates
# what the subclass targets add from what the pooled architecture adds.
# VARIANTS (methods.subclass_variants, issue 22): the default's S, β, τ and λ, each with one change; they
# run when named, not by default.
SUBCLASS_WEIGHTS = {"LELP λ=1": 1.0, "LELP λ=0.5": 0.5, "LELP λ=0.25": 0.25, "LELP λ=0.1": 0.1, "LELP λ=0 (pooled KD)": 0.0}
STUDENT_KINDS = ("linear", "mlp", "cnn")


@dataclasses.dataclass
class RealQualityConfig:
    dataset: str = "fashion-mnist-coarse"
    students: Sequence[str] = ("linear", "mlp")
    fractions: Sequence[float] = (0.01, 0.1, 1.0)
    seeds: int = 5
    n_subclasses: int = 4
    beta: float = DEFAULT_BETA
    tau: float = 1.0
    subclass_weight: Optional[float] = None  # λ of the "LELP" row; None: the library's default
    steps: int = 1500
    batch_size: int = 256
    lr: float = 3e-3
    kd_taus: Sequence[float] = (1.0, 2.0, 4.0)
    tune_subclasses: Sequence[int] = (2, 4, 8)
    tune_betas: Sequence[float] = (0.1, 0.25, 1.0)
    tune_taus: Sequence[float] = (1.0,)
    device: str = "cpu"
    cache_dir: str = DEFAULT_CACHE
    # "LELP library": False, the benchmark's small grid (tune_subclasses x tune_betas x τ {1, 2}, proxies of a
    # fifth of the steps); True, lelp_fast.tune's own defaults (TuneGrid()), as `lelp-fast tune` runs it
    library_defaults: bool = False


MODES = {
    "cpu": {},  # the dataclass defaults
    "gpu": {"students": ("linear", "mlp", "cnn"), "steps": 6000, "device": "cuda", "tune_taus": (1.0, 2.0, 4.0)},
}


def real_config(dataset: str, mode: str = "cpu", **overrides) -> RealQualityConfig:
    """The config of a mode ("cpu" or "gpu"), with ``overrides`` (None values ignored)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    fields = {**MODES[mode], **{k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()
                                if v is not None}}
    return RealQualityConfig(dataset=dataset, **fields)


def make_student(kind: str, x: torch.Tensor, n_out: int, seed: int) -> nn.Module:
    """linear: inputs -> C·S; mlp: one hidden layer of 32; cnn (images only): conv 8, conv 16, linear."""
    torch.manual_seed(seed)
    n_in = x[0].numel()
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_out))
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 32), nn.ReLU(), nn.Linear(32, n_out))
    if kind == "cnn" and x.ndim == 4:
        return nn.Sequential(nn.Conv2d(x.shape[1], 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(3), nn.Flatten(),
                             nn.Linear(16 * 9, n_out))
    raise ValueError(f"students must be among {STUDENT_KINDS} (cnn for image tasks only), got {kind!r}")


class Cell:
    """One task, student kind and fraction: trains students and scores them."""

    def __init__(self, task: RealTask, kind: str, fraction: float, cfg: RealQualityConfig, fits: Dict):
        self.task, self.kind, self.fraction, self.cfg, self.fits = task, kind, fraction, cfg, fits
        dev = torch.device(cfg.device)
        self.x, self.y = task.x.to(dev), task.y.to(dev)
        self.x_test, self.y_test = task.x_test.to(dev), task.y_test.to(dev)
        self.val = task.val.to(dev)
        self.z = task.z.to(dev)
        self.n_rows = max(16 * task.num_classes, int(fraction * len(task.train)))

    def rows(self, seed: int) -> torch.Tensor:
        perm = torch.randperm(len(self.task.train), generator=torch.Generator().manual_seed(1000 + seed))
        return self.task.train[perm[:self.n_rows]]

    def train(self, seed: int, rows: torch.Tensor, n_out: int, loss_fn) -> nn.Module:
        """Minibatch Adam, ``cfg.steps`` steps of batches drawn with replacement from ``rows``."""
        cfg = self.cfg
        model = make_student(self.kind, self.task.x, n_out, seed).to(cfg.device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(seed)
        for step in range(cfg.steps):
            idx = rows[torch.randint(0, len(rows), (min(cfg.batch_size, len(rows)),), generator=g)].to(cfg.device)
            opt.zero_grad()
            loss_fn(model(self.x[idx]), idx, step).backward()
            opt.step()
        return model.eval()

    def accuracy(self, model: nn.Module, tau: float, on: str = "test") -> float:
        x, y = (self.x_test, self.y_test) if on == "test" else (self.x[self.val], self.y[self.val])
        with torch.no_grad():
            out = torch.cat([model(part) for part in x.split(8192)])
        c = self.task.num_classes
        return float((class_logits(out, c, out.shape[1] // c, tau).argmax(1) == y).double().mean())

    # -- the methods: each returns (model, τ it pools at) ------------------------------------

    def hard_labels(self, seed, rows):
        return self.train(seed, rows, self.task.num_classes, lambda out, i, _: F.cross_entropy(out, self.y[i])), 1.0

    def kd(self, seed, rows, tau):
        kd = KDLoss(self.task.num_classes, tau=tau)
        return self.train(seed, rows, self.task.num_classes, lambda out, i, _: kd(out, self.z[i])), tau

    def annealing_kd(self, seed, rows):
        sched = AnnealingKD(tau_max=10.0, stage1_epochs=2 * self.cfg.steps // 3)
        model = self.train(seed, rows, self.task.num_classes,
                           lambda out, i, step: sched.loss(step, out, self.z[i], self.y[i]))
        return model, 1.0

    def subclass_targets(self, seed, rows, log_t: torch.Tensor, s: int, tau: float,
                         subclass_weight: Optional[float] = 1.0):
        loss = LELPLoss(num_classes=self.task.num_classes, n_subclasses=s, tau=tau, subclass_weight=subclass_weight)
        log_t = log_t.to(self.cfg.device)
        return self.train(seed, rows, self.task.num_classes * s, lambda out, i, _: loss(out, log_t[i])), tau

    def lelp(self, seed, rows, s: int, beta: float, tau: float, subclass_weight: Optional[float] = 1.0):
        p = self.fits[("pca", s)]
        return self.subclass_targets(seed, rows, p.targets(self.task.h, self.task.z, beta=beta, tau=tau), s, tau,
                                     subclass_weight)

    def both_signs(self, seed, rows):
        """2·(S/2) subclasses from S/2 directions: each direction's two halves (u and −u), so the
        student has as many outputs as the default's."""
        cfg, t = self.cfg, self.task
        signs = both_signs_map(self.fits[("pca", cfg.n_subclasses // 2)])
        return self.subclass_targets(seed, rows, signs.targets(t.h, t.z, cfg.beta, cfg.tau), signs.n_subclasses,
                                     cfg.tau)

    def library_choice(self, seed, rows, choice):
        """What ``lelp-fast tune`` chose on the first seed's rows: LELP (S, β, τ) or KD (τ)."""
        if choice["subclasses"] == 1:
            return self.kd(seed, rows, choice["tau"])
        return self.lelp(seed, rows, choice["subclasses"], choice["beta"] or self.cfg.beta, choice["tau"],
                         choice.get("subclass_weight", 1.0))

    def variant(self, seed, rows, name: str):
        cfg, s = self.cfg, self.cfg.n_subclasses
        u = self.fits[(name, s)].project(self.task.h)
        return self.subclass_targets(seed, rows, subclass_log_targets(u, self.task.z, s, cfg.beta, cfg.tau), s, cfg.tau)

    def subclass_variant(self, seed, rows, name: str):
        """One of ``VARIANTS`` at the "LELP" row's λ; its targets are made per batch by the library's targets
        op (β may change by step)."""
        cfg, c = self.cfg, self.task.num_classes
        variant = self.fits[(name, cfg.n_subclasses)]
        h, z = self.task.h, self.task.z
        loss = LELPLoss(num_classes=c, n_subclasses=variant.n_subclasses, tau=cfg.tau,
                        subclass_weight=cfg.subclass_weight)

        def loss_fn(out, i, step):
            i = i.cpu()
            return loss(out, variant.targets(h[i], z[i], step, cfg.steps, cfg.beta, cfg.tau).to(out.device))

        return self.train(seed, rows, c * variant.n_subclasses, loss_fn), cfg.tau

    def oracle(self, seed, rows):
        t, cfg = self.task, self.cfg
        u = oracle_coordinates(t.sub, t.y, t.num_classes, t.hidden_subclasses)
        log_t = subclass_log_targets(u, t.z, t.hidden_subclasses, cfg.beta, cfg.tau)
        return self.subclass_targets(seed, rows, log_t, t.hidden_subclasses, cfg.tau)


def _fits(task: RealTask, cfg: RealQualityConfig, methods: Sequence[str]) -> Dict:
    """Projector (and ablation) fits on the teacher's embeddings of the whole training pool."""
    h, y, c = task.h[task.train], task.y[task.train], task.num_classes
    fits = {}
    extra = {cfg.n_subclasses // 2} if "LELP both signs" in methods else set()
    for s in sorted(set(cfg.tune_subclasses) | {cfg.n_subclasses} | extra):
        fits[("pca", s)] = LELPProjector(s, beta=cfg.beta, tau=cfg.tau, seed=0).fit(h, y, **task.head)
    if "LELP library" in methods:  # every other S the tuner may choose, where the pool supports it (it skips the rest)
        for s in sorted(set(_library_grid(cfg).subclasses) - {k[1] for k in fits}):
            try:
                fits[("pca", s)] = LELPProjector(s, beta=cfg.beta, tau=cfg.tau, seed=0).fit(h, y, **task.head)
            except ValueError:  # e.g. a class whose embeddings span fewer than S directions
                pass
    if "random projections" in methods:
        fits[("random projections", cfg.n_subclasses)] = RandomProjectionSubclasses(cfg.n_subclasses).fit(h, y, c)
    if "k-means" in methods:
        fits[("k-means", cfg.n_subclasses)] = KMeansSubclasses(cfg.n_subclasses).fit(h, y, c)
    for name in VARIANTS:
        if name in methods:
            fits[(name, cfg.n_subclasses)] = SubclassVariant(name, h, y, c, cfg.n_subclasses,
                                                             task.head["head_weight"])
    return fits


def _tune(cell: Cell, methods: Sequence[str]) -> Dict:
    """KD's τ (and, for *LELP tuned*, its S, β, τ) by validation accuracy on the first seed, with the
    whole curve; without KD or *LELP tuned* among ``methods``, nothing is trained here."""
    cfg, rows = cell.cfg, cell.rows(0)
    tuned: Dict = {"kd_tau": cfg.tau}
    if "KD" in methods:
        kd_curve = {tau: cell.accuracy(cell.kd(0, rows, tau)[0], tau, on="val") for tau in cfg.kd_taus}
        tuned.update(kd_tau=max(kd_curve, key=kd_curve.get), kd_curve={str(k): v for k, v in kd_curve.items()})
    if "LELP tuned" in methods:
        curve = {}
        for s, beta, tau in itertools.product(cfg.tune_subclasses, cfg.tune_betas, cfg.tune_taus):
            curve[(s, beta, tau)] = cell.accuracy(cell.lelp(0, rows, s, beta, tau)[0], tau, on="val")
        tuned.update(lelp=max(curve, key=curve.get),
                     lelp_curve={f"S={s}, beta={b}, tau={t}": v for (s, b, t), v in curve.items()})
    if "LELP library" in methods:
        tuned["library"] = _library_choice(cell, rows)
    return tuned


def _library_grid(cfg: RealQualityConfig):
    """The tuner's grid for "LELP library" (see ``RealQualityConfig.library_defaults``)."""
    from ..tune import TuneGrid

    # The finals train the cell's budget, as `lelp-fast tune` takes the config's; proxies are scored at
    # their last evaluation, as Cell.train keeps its students (distill keeps the best epoch instead).
    if cfg.library_defaults:
        return TuneGrid(final_steps=cfg.steps, keep="last")
    return TuneGrid(subclasses=cfg.tune_subclasses, betas=cfg.tune_betas, taus=(1.0, 2.0),
                    steps=max(1, cfg.steps // 5), final_steps=cfg.steps, keep="last", evals=5, seeds=3)


def _library_choice(cell: Cell, rows: torch.Tensor) -> Dict:
    """``lelp_fast.tune.search`` on the first seed's rows, its proxies the cell's student with the cell's lr and
    batch (as ``lelp-fast tune`` takes the run config's); returns its choice and the decision's reason."""
    from ..tune import ProxySettings, TeacherOutputs, search

    cfg, t = cell.cfg, cell.task
    head = (t.head["head_weight"].detach(), t.head["head_bias"].detach())
    teacher = TeacherOutputs(t.h[rows], t.z[rows], t.y[rows], head)

    def student(k):  # search seeds the global generator; the runner's factory takes the seed itself
        return make_student(cell.kind, t.x, k, torch.initial_seed()).to(cfg.device)

    summary = search(teacher, (cell.x[rows], cell.y[rows]), (cell.x[cell.val], cell.y[cell.val]), student,
                     ProxySettings(lr=cfg.lr, batch_size=cfg.batch_size), _library_grid(cfg), log=lambda _: None)
    best, decision = summary["best"], summary["decision"]
    gain = decision.get("gain") or {}
    return {"subclasses": best["subclasses"], "beta": best["beta"], "tau": best["tau"],
            "subclass_weight": best["subclass_weight"], "reason": decision["reason"],
            "lelp": summary["lelp"], "validation_gain": gain.get("mean"), "validation_interval": gain.get("interval"),
            "skipped": summary["skipped"], "kd_tau": summary["kd"]["tau"],
            "kd_proxy_tau": summary["kd_proxy"]["tau"], "kd_finals": summary["kd_finals"]}


def _run_method(cell: Cell, method: str, seed: int, rows: torch.Tensor, tuned: Dict):
    cfg = cell.cfg
    if method == "hard labels":
        return cell.hard_labels(seed, rows)
    if method == "KD":
        return cell.kd(seed, rows, tuned["kd_tau"])
    if method == "annealing KD":
        return cell.annealing_kd(seed, rows)
    if method == "LELP":
        return cell.lelp(seed, rows, cfg.n_subclasses, cfg.beta, cfg.tau, cfg.subclass_weight)
    if method == "LELP tuned":
        return cell.lelp(seed, rows, *tuned["lelp"])
    if method == "LELP library":
        return cell.library_choice(seed, rows, tuned["library"])
    if method in SUBCLASS_WEIGHTS:
        return cell.lelp(seed, rows, cfg.n_subclasses, cfg.beta, cfg.tau, SUBCLASS_WEIGHTS[method])
    if method == "LELP both signs":
        return cell.both_signs(seed, rows)
    if method in ("random projections", "k-means"):
        return cell.variant(seed, rows, method)
    if method == "oracle":
        return cell.oracle(seed, rows)
    if method in VARIANTS:
        return cell.subclass_variant(seed, rows, method)
    raise ValueError(f"unknown method {method!r}; choose from {REAL_METHODS + VARIANTS}")


def paired_summary(per_seed: Dict[str, List[float]], baseline: str = "KD") -> Dict[str, Dict]:
    """Per method: mean and std of test accuracy, and of its difference from ``baseline`` on the same
    seed, with the number of seeds it wins."""
    base = np.array(per_seed[baseline])
    out = {}
    for method, accs in per_seed.items():
        a = np.array(accs)
        diff = a - base
        out[method] = {"mean": float(a.mean()), "std": float(a.std()), "diff_mean": float(diff.mean()),
                       "diff_std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                       "wins": int((diff > 0).sum()), "seeds": len(a)}
    return out


def run_cell(task: RealTask, kind: str, fraction: float, cfg: RealQualityConfig, methods: Sequence[str],
             fits: Dict, progress: bool = True) -> Dict:
    cell = Cell(task, kind, fraction, cfg, fits)
    start = time.perf_counter()
    tuned = _tune(cell, methods)
    per_seed: Dict[str, List[float]] = {m: [] for m in methods}
    for seed in range(cfg.seeds):
        rows = cell.rows(seed)
        for method in methods:
            model, tau = _run_method(cell, method, seed, rows, tuned)
            per_seed[method].append(cell.accuracy(model, tau))
        if progress:
            print(f"  {task.name} {kind} {fraction:g} seed {seed}: "
                  + ", ".join(f"{m} {100 * v[-1]:.2f}" for m, v in per_seed.items()), flush=True)
    tuned = {k: (list(v) if isinstance(v, tuple) else v) for k, v in tuned.items()}
    return {"student": kind, "fraction": fraction, "rows": cell.n_rows, "tuned": tuned, "per_seed": per_seed,
            "summary": paired_summary(per_seed) if "KD" in methods else {}, "seconds": time.perf_counter() - start}


def run_real_quality(cfg: RealQualityConfig, methods: Optional[Sequence[str]] = None, progress: bool = True) -> Dict:
    if cfg.dataset not in REAL_TASKS:
        raise ValueError(f"dataset must be one of {tuple(REAL_TASKS)}, got {cfg.dataset!r}")
    methods = checked_methods(methods, REAL_METHODS)
    for f in cfg.fractions:
        if not 0 < f <= 1:
            raise ValueError(f"fractions must be in (0, 1], got {f}")
    task = REAL_TASKS[cfg.dataset](cfg.cache_dir)
    if task.sub is None and "oracle" in methods:
        methods.remove("oracle")  # no true subclasses to give it
    for kind in cfg.students:
        make_student(kind, task.x, 2, 0)  # a clear error before any training
    fits = _fits(task, cfg, methods)
    cells = [run_cell(task, kind, f, cfg, methods, fits, progress) for kind in cfg.students for f in cfg.fractions]
    return {"config": dataclasses.asdict(cfg), "dataset": task.name, "teacher_accuracy": task.teacher_accuracy,
            "train_rows": len(task.train), "cells": cells}


def format_real_markdown(result: Dict) -> str:
    cfg = result["config"]
    lines = [f"{result['dataset']}: teacher test accuracy {100 * result['teacher_accuracy']:.2f} %, {cfg['seeds']} "
             f"seeds, {cfg['steps']} steps of batch {cfg['batch_size']}; LELP default S={cfg['n_subclasses']}, "
             f"beta={cfg['beta']}, tau={cfg['tau']}, lambda={_weight_text(cfg.get('subclass_weight'))}", ""]
    for cell in result["cells"]:
        t = cell["tuned"]
        lines += [f"**{cell['student']} student, {cell['fraction']:g} of the training pool ({cell['rows']} rows)**; "
                  f"KD tau={t['kd_tau']}" + (f"; LELP tuned S, beta, tau = {tuple(t['lelp'])}" if "lelp" in t else "")
                  + (f"; library's choice (first seed): {_choice_text(t['library'])}" if "library" in t else ""),
                  "", "| method | test accuracy (%) | minus tuned KD, paired (points) | wins |", "|---|---|---|---|"]
        for method, s in cell["summary"].items():
            lines.append(f"| {method} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | "
                         f"{100 * s['diff_mean']:+.2f} ± {100 * s['diff_std']:.2f} | {s['wins']}/{s['seeds']} |")
        lines.append("")
    return "\n".join(lines)


def _weight_text(weight) -> str:
    return f"{resolve_subclass_weight(weight)}" + (" (the library's default)" if weight is None else "")


def _choice_text(choice: Dict) -> str:
    setting = ("KD, tau=" + str(choice["tau"]) if choice["subclasses"] == 1
               else f"S={choice['subclasses']}, beta={choice['beta']}, tau={choice['tau']}, "
                    f"lambda={choice.get('subclass_weight', 1.0)}")
    return f"{setting} ({choice['reason']})"


def subclass_entropy(log_targets: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean entropy of the subclass split inside each row's labelled class, over its maximum log S
    (1: flat, the subclasses say nothing; 0: one subclass per row)."""
    n, k = log_targets.shape
    s = k // num_classes
    if s == 1:
        return 1.0
    within = torch.log_softmax(log_targets.double().view(n, num_classes, s)[torch.arange(n), labels], dim=1)
    return float((-(within.exp() * within).sum(1) / np.log(s)).mean())


def sweep(cfg: RealQualityConfig, kind: str, fraction: float, betas: Sequence[float],
          subclasses: Sequence[int], progress: bool = True) -> Dict:
    """LELP's validation and test accuracy against β (at S = cfg.n_subclasses) and against S (at
    β = cfg.beta), over cfg.seeds seeds, with tuned KD's on the same seeds; and the mean subclass
    entropy of the targets on the training pool at each β."""
    task = REAL_TASKS[cfg.dataset](cfg.cache_dir)
    cfg = dataclasses.replace(cfg, tune_subclasses=tuple(sorted(set(subclasses) | {cfg.n_subclasses})))
    cell = Cell(task, kind, fraction, cfg, _fits(task, cfg, ["LELP"]))
    kd_tau = _tune(cell, ["KD"])["kd_tau"]
    points = [("beta", b, cfg.n_subclasses, b) for b in betas] + [("S", s, s, cfg.beta) for s in subclasses]
    curves: Dict = {"beta": {}, "S": {}, "KD": {"tau": kd_tau, "val": [], "test": []}, "entropy": {}}
    for seed in range(cfg.seeds):
        rows = cell.rows(seed)
        kd_model = cell.kd(seed, rows, kd_tau)[0]
        curves["KD"]["val"].append(cell.accuracy(kd_model, kd_tau, on="val"))
        curves["KD"]["test"].append(cell.accuracy(kd_model, kd_tau))
        for axis, key, s, beta in points:
            model, tau = cell.lelp(seed, rows, s, beta, cfg.tau)
            point = curves[axis].setdefault(str(key), {"val": [], "test": []})
            point["val"].append(cell.accuracy(model, tau, on="val"))
            point["test"].append(cell.accuracy(model, tau))
        if progress:
            print(f"  sweep {task.name} {kind} {fraction:g} seed {seed} done", flush=True)
    pool = task.train
    for beta in betas:
        log_t = cell.fits[("pca", cfg.n_subclasses)].targets(task.h[pool], task.z[pool], beta=beta, tau=cfg.tau)
        curves["entropy"][str(beta)] = subclass_entropy(log_t, task.y[pool], task.num_classes)
    return {"dataset": task.name, "student": kind, "fraction": fraction, "seeds": cfg.seeds, "S": cfg.n_subclasses,
            "beta": cfg.beta, "curves": curves}
