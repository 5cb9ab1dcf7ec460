"""Runs every distillation method on one task over several seeds (``lelp-fast bench quality``).

Per seed: split the rows (test, student rows = a fraction of the training rows, validation rows
for tuning), train M teacher MLPs (teacher 0 is "the" teacher), fit the projectors on teacher 0's
embeddings of all training rows, then train the same small student MLP with each method on the
student rows, full batch, and report test accuracy, top-1 agreement and predictive KL against
teacher 0 (fidelity, Stanton et al. 2021), and the wall time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..loss import LELPLoss
from ..methods import (AnnealingKD, InstanceTeacherWeights, KDLoss, KMeansSubclasses, RandomProjectionSubclasses,
                       ReinforcedTeacherSelector, fixed_weights, oracle_coordinates, subclass_log_targets,
                       uniform_weights)
from ..methods.multi_teacher import per_row_ce
from ..methods.subclass_variants import VARIANTS, SubclassVariant
from ..metrics import agreement, predictive_kl
from ..ops import distill_loss
from ..projector import LELPProjector
from ..reference import class_logits
from .datasets import DATASETS
from .models import MLP

METHODS = (
    "hard labels", "vanilla KD", "annealing KD", "LELP", "LELP tuned", "LELP no rotation", "LELP no null space",
    "random projections", "k-means", "oracle", "multi-teacher uniform", "multi-teacher fixed",
    "multi-teacher AMTML", "multi-teacher RL",
)
# Issue 22's LELP variants run when named (``--methods "LELP GMM"``), not by default: none is a default.
TUNING_GRID = [(s, b) for s in (2, 4, 8) for b in (0.5, 1.0, 2.0)]


@dataclass
class QualityConfig:
    dataset: str = "digits-parity"
    seeds: int = 5
    n_subclasses: int = 4
    beta: float = 1.0
    tau: float = 1.0
    student_fraction: float = 0.25  # of the training rows outside the validation split
    test_fraction: float = 0.4
    validation_fraction: float = 0.2  # of the training rows, for tuning and fixed teacher weights
    teacher_hidden: int = 256
    teacher_embedding: int = 64
    student_hidden: int = 32  # 0: a linear student
    teacher_epochs: int = 300
    student_epochs: int = 300
    n_teachers: int = 3
    # λ of the LELP rows (0: KD, 1: the paper's LELP; None: the library's default). The toy tables
    # (docs/results.md) were measured at λ = 1, β = 1; every other subclass row trains at λ = 1.
    subclass_weight: Optional[float] = 1.0


class _Context:
    """One seed's data, teachers and their outputs."""

    def __init__(self, seed: int, cfg: QualityConfig):
        x, y, sub = DATASETS[cfg.dataset]()
        self.num_classes = int(y.max()) + 1
        self.hidden_subclasses = int(sub.max()) + 1
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(x.shape[0], generator=g)
        n_test = int(cfg.test_fraction * x.shape[0])
        self.test, train = perm[:n_test], perm[n_test:]
        n_val = int(cfg.validation_fraction * train.shape[0])
        self.val, self.train = train[:n_val], train[n_val:]
        n_student = max(self.num_classes * 8, int(cfg.student_fraction * len(self.train)))
        self.student_rows = self.train[:n_student]  # a fraction of the non-validation training rows
        self.x, self.y, self.sub, self.seed, self.cfg = x, y, sub, seed, cfg
        self.teachers = []
        for m in range(cfg.n_teachers):  # teacher 0 is the main one; the others are smaller
            torch.manual_seed(seed * 100 + m)
            teacher = MLP(x.shape[1], max(16, cfg.teacher_hidden >> m), self.num_classes, cfg.teacher_embedding)
            _train(teacher, x[self.train], lambda out, _: F.cross_entropy(out, y[self.train]), cfg.teacher_epochs)
            self.teachers.append(teacher.eval())
        with torch.no_grad():
            self.emb = [t.embed(x) for t in self.teachers]
            self.logits = [t(x) for t in self.teachers]
        self.teacher = self.teachers[0]

    def projector(self, m: int = 0, n_subclasses: Optional[int] = None, beta: Optional[float] = None,
                  **kw) -> LELPProjector:
        cfg, t = self.cfg, self.teachers[m]
        p = LELPProjector(n_subclasses or cfg.n_subclasses, beta=beta or cfg.beta, tau=cfg.tau, seed=self.seed, **kw)
        return p.fit(self.emb[m][self.train], self.y[self.train], head_weight=t.head.weight.detach(),
                     head_bias=t.head.bias.detach())

    def metrics(self, student) -> Dict[str, float]:
        pooled, teacher = self._class_logits(student, self.test), self.logits[0][self.test]
        return {"accuracy": self.accuracy_on(student, self.test), "agreement": agreement(teacher, pooled),
                "predictive_kl": predictive_kl(teacher, pooled)}

    def accuracy_on(self, student, rows) -> float:
        return float((self._class_logits(student, rows).argmax(1) == self.y[rows]).double().mean())

    def _class_logits(self, student, rows) -> torch.Tensor:
        with torch.no_grad():
            out = student(self.x[rows])
        return class_logits(out, self.num_classes, out.shape[1] // self.num_classes, self.cfg.tau)  # the loss's τ


def _train(model, x, loss_fn: Callable, epochs: int, lr: float = 1e-2, extra_params=()) -> None:
    """Full-batch Adam; ``loss_fn(model(x), epoch)``."""
    opt = torch.optim.Adam(list(model.parameters()) + list(extra_params), lr=lr, weight_decay=1e-4)
    for epoch in range(epochs):
        opt.zero_grad()
        loss_fn(model(x), epoch).backward()
        opt.step()


def _student(ctx: _Context, n_out: int):
    torch.manual_seed(ctx.seed + 1)  # the same initialisation for every method
    return MLP(ctx.x.shape[1], ctx.cfg.student_hidden, n_out)


def _distil(ctx: _Context, log_t: torch.Tensor, n_subclasses: int, **loss_kw):
    rows = ctx.student_rows
    student = _student(ctx, ctx.num_classes * n_subclasses)
    loss_kw.setdefault("subclass_weight", 1.0)  # the ablations and the oracle: the whole subclass targets
    loss = LELPLoss(num_classes=ctx.num_classes, n_subclasses=n_subclasses, tau=ctx.cfg.tau, **loss_kw)
    _train(student, ctx.x[rows], lambda out, _: loss(out, log_t), ctx.cfg.student_epochs)
    return student


def _lelp(ctx: _Context, **projector_kw):
    p = ctx.projector(**projector_kw)
    rows = ctx.student_rows
    return _distil(ctx, p.targets(ctx.emb[0][rows], ctx.logits[0][rows]), p.n_subclasses,
                   subclass_weight=ctx.cfg.subclass_weight)


def _variant(ctx: _Context, maker) -> torch.nn.Module:
    s, rows = ctx.cfg.n_subclasses, ctx.student_rows
    fitted = maker(s).fit(ctx.emb[0][ctx.train], ctx.y[ctx.train], ctx.num_classes)
    u = fitted.project(ctx.emb[0][rows])
    return _distil(ctx, subclass_log_targets(u, ctx.logits[0][rows], s, ctx.cfg.beta, ctx.cfg.tau), s)


def _subclass_variant(ctx: _Context, name: str):
    """One of issue 22's ``VARIANTS`` at the LELP row's λ; targets per step (β may change by step)."""
    cfg, rows, head = ctx.cfg, ctx.student_rows, ctx.teachers[0].head
    variant = SubclassVariant(name, ctx.emb[0][ctx.train], ctx.y[ctx.train], ctx.num_classes, cfg.n_subclasses,
                              head.weight.detach(), seed=ctx.seed)
    h, z = ctx.emb[0][rows], ctx.logits[0][rows]
    student = _student(ctx, ctx.num_classes * variant.n_subclasses)
    loss = LELPLoss(num_classes=ctx.num_classes, n_subclasses=variant.n_subclasses, tau=cfg.tau,
                    subclass_weight=cfg.subclass_weight)
    _train(student, ctx.x[rows],
           lambda out, step: loss(out, variant.targets(h, z, step, cfg.student_epochs, cfg.beta, cfg.tau)),
           cfg.student_epochs)
    return student


def _multi_teacher_targets(ctx: _Context):
    rows = ctx.student_rows
    projectors = [ctx.projector(m) for m in range(ctx.cfg.n_teachers)]
    return torch.stack([p.targets(ctx.emb[m][rows], ctx.logits[m][rows]) for m, p in enumerate(projectors)], 1)


def run_method(ctx: _Context, method: str):
    cfg, rows, c = ctx.cfg, ctx.student_rows, ctx.num_classes
    xs, ys = ctx.x[rows], ctx.y[rows]
    if method == "hard labels":
        student = _student(ctx, c)
        _train(student, xs, lambda out, _: F.cross_entropy(out, ys), cfg.student_epochs)
    elif method == "vanilla KD":
        student = _student(ctx, c)
        kd = KDLoss(c, tau=cfg.tau)
        _train(student, xs, lambda out, _: kd(out, ctx.logits[0][rows]), cfg.student_epochs)
    elif method == "annealing KD":
        student = _student(ctx, c)
        sched = AnnealingKD(tau_max=10.0, stage1_epochs=2 * cfg.student_epochs // 3)
        _train(student, xs, lambda out, epoch: sched.loss(epoch, out, ctx.logits[0][rows], ys), cfg.student_epochs)
    elif method == "LELP":
        student = _lelp(ctx)
    elif method == "LELP tuned":  # S and β picked on the validation rows
        best = None
        for s, b in TUNING_GRID:
            candidate = _lelp(ctx, n_subclasses=s, beta=b)
            score = ctx.accuracy_on(candidate, ctx.val)
            if best is None or score > best[0]:
                best = (score, candidate, s, b)
        student = best[1]
        return student, {"chosen": f"S={best[2]}, beta={best[3]}"}
    elif method == "LELP no rotation":
        student = _lelp(ctx, rotate=False)
    elif method == "LELP no null space":
        student = _lelp(ctx, null_space=False)
    elif method == "random projections":
        student = _variant(ctx, lambda s: RandomProjectionSubclasses(s, seed=ctx.seed))
    elif method == "k-means":
        student = _variant(ctx, lambda s: KMeansSubclasses(s, seed=ctx.seed))
    elif method == "oracle":
        h = ctx.hidden_subclasses
        u = oracle_coordinates(ctx.sub[rows], ys, c, h)
        student = _distil(ctx, subclass_log_targets(u, ctx.logits[0][rows], h, cfg.beta, cfg.tau), h)
    elif method in VARIANTS:
        student = _subclass_variant(ctx, method)
    elif method.startswith("multi-teacher"):
        student = _multi_teacher(ctx, method.split()[-1])
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS + VARIANTS}")
    return student, {}


def _multi_teacher(ctx: _Context, kind: str):
    cfg, rows, c, s = ctx.cfg, ctx.student_rows, ctx.num_classes, ctx.cfg.n_subclasses
    xs, ys, m = ctx.x[rows], ctx.y[rows], cfg.n_teachers
    log_t = _multi_teacher_targets(ctx)
    student = _student(ctx, c * s)
    loss = LELPLoss(num_classes=c, n_subclasses=s, tau=cfg.tau, subclass_weight=1.0)
    if kind in ("uniform", "fixed"):
        if kind == "uniform":
            w = uniform_weights(len(rows), m)
        else:  # proportional to each teacher's validation accuracy
            acc = [float((ctx.logits[i][ctx.val].argmax(1) == ctx.y[ctx.val]).double().mean()) for i in range(m)]
            w = fixed_weights(acc, len(rows))
        _train(student, xs, lambda out, _: loss(out, log_t, teacher_weights=w), cfg.student_epochs)
    elif kind == "AMTML":
        weigher = InstanceTeacherWeights(cfg.student_hidden or ctx.x.shape[1], m, seed=ctx.seed)
        _train(student, xs, lambda out, _: InstanceTeacherWeights.mixture_loss(
            out, log_t, weigher(student.embed(xs)), num_classes=c, n_subclasses=s, tau=cfg.tau),
            cfg.student_epochs, extra_params=weigher.parameters())
    else:  # RL: the policy and the student take turns
        selector = ReinforcedTeacherSelector(cfg.student_hidden or ctx.x.shape[1], c, m, seed=ctx.seed)
        teacher_logits = torch.stack([ctx.logits[i][rows] for i in range(m)], 1)
        opt = torch.optim.Adam(student.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(cfg.student_epochs):
            with torch.no_grad():
                states = selector.states(student.embed(xs), teacher_logits, ys)
                before = per_row_ce(student(xs), ys, c, s)
            actions, w = selector.select(states)
            opt.zero_grad()
            distill_loss(student(xs), log_t, num_classes=c, n_subclasses=s, tau=cfg.tau, teacher_weights=w).backward()
            opt.step()
            with torch.no_grad():
                after = per_row_ce(student(xs), ys, c, s)
            selector.update(states, actions, before - after)
    return student


def checked_methods(methods: Optional[Sequence[str]], known: Sequence[str]) -> List[str]:
    """``methods`` as a list (all of ``known`` when None; issue 22's ``VARIANTS`` only when named); an
    unknown name is a one-line error."""
    methods = list(known if methods is None else methods)
    for method in methods:
        if method not in known and method not in VARIANTS:
            raise ValueError(f"unknown method {method!r}; choose from {tuple(known) + VARIANTS}")
    return methods


def run_quality(cfg: QualityConfig, methods: Optional[Sequence[str]] = None, progress: bool = True) -> Dict:
    """All seeds x methods; ``{"config", "rows": [{method, *_mean, *_std, seconds}], "per_seed"}``."""
    from tqdm.auto import tqdm

    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {cfg.dataset!r}")
    methods = checked_methods(methods, METHODS)
    per_seed: List[Dict] = []
    for seed in tqdm(range(cfg.seeds), desc=f"{cfg.dataset} seeds", disable=not progress):
        ctx = _Context(seed, cfg)
        results = {"teacher": {"accuracy": float((ctx.logits[0][ctx.test].argmax(1) == ctx.y[ctx.test]).double().mean())}}
        for method in methods:
            start = time.perf_counter()
            student, info = run_method(ctx, method)
            results[method] = {**ctx.metrics(student), "seconds": time.perf_counter() - start, **info}
        per_seed.append(results)
    rows = []
    for method in ["teacher"] + methods:
        row: Dict = {"method": method}
        for metric in ("accuracy", "agreement", "predictive_kl", "seconds"):
            vals = [r[method][metric] for r in per_seed if metric in r[method]]
            if vals:
                row[f"{metric}_mean"], row[f"{metric}_std"] = float(np.mean(vals)), float(np.std(vals))
        chosen = [r[method]["chosen"] for r in per_seed if "chosen" in r[method]]
        if chosen:
            row["chosen"] = chosen
        rows.append(row)
    return {"config": asdict(cfg), "rows": rows, "per_seed": per_seed}


def markdown_rows(rows: List[Dict], with_seconds: bool = True) -> List[str]:
    """Table rows: method, accuracy, agreement, predictive KL (mean ± std), optionally seconds."""
    lines = []
    for row in rows:
        cells = [row["method"], f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f}"]
        if "agreement_mean" in row:
            cells += [f"{100 * row['agreement_mean']:.2f} ± {100 * row['agreement_std']:.2f}",
                      f"{row['predictive_kl_mean']:.4f} ± {row['predictive_kl_std']:.4f}"]
            cells += [f"{row['seconds_mean']:.2f}"] if with_seconds else []
        else:
            cells += ["—"] * (3 if with_seconds else 2)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_markdown(result: Dict) -> str:
    cfg = result["config"]
    lines = [f"{cfg['dataset']}: {cfg['seeds']} seeds, S={cfg['n_subclasses']}, beta={cfg['beta']}, tau={cfg['tau']}, "
             f"students on {cfg['student_fraction']:.0%} of the training rows, {cfg['n_teachers']} teachers", "",
             "| method | test accuracy (%) | agreement (%) | predictive KL | seconds / seed |", "|---|---|---|---|---|"]
    return "\n".join(lines + markdown_rows(result["rows"]))
