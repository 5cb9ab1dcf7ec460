"""``lelp-fast tune``: choose S, β and τ on the validation split, or keep KD when LELP does not win.

One projector fit per S (with the run config's other fit settings); for each S the compact
targets (the coordinates ``u`` and the teacher's logits ``z``) are computed once, so every (β, τ)
only re-runs the two log-softmaxes. Each grid point
trains proxies (the config's student) for a fixed number of optimiser steps, on ``seeds`` seeds,
and scores each proxy at its best validation evaluation, as ``distill`` keeps its best epoch
(``keep="last"`` scores the last one, for students kept as they end: the quality benchmark's). The
grid includes KD (S = 1, its τ tuned): S = 1 targets are exactly the KD targets.

The validation rows are split in two halves, each class evenly: the grid and KD's τ are chosen on
one, the decision is judged on the other. On a real text task (tweets, an MLP on 473 rows) the best
of some 60 points, picked and judged on the same rows, showed +1.24 points over KD on validation
and lost 1.56 on test.

The finals train for the student's own budget (``final_steps``: ``tune`` takes the run config's
epochs x batches, ``search`` the grid's ``steps`` unless told), each on fresh seeds, so the noise
that picked a point does not also judge it. KD's τ is chosen again there among every τ of the grid,
because a proxy trained a fraction of the budget cannot show what happens later: on the same task
KD at τ = 1 peaks early and then overfits, so kept at its last step it lost 2.2 points to KD at
τ = 4, against 0.7 at its best epoch (3 seeds). Then the best LELP point of the proxies and that KD
are trained on a second set of fresh seeds and scored on the judging half, and LELP is chosen only
when the paired 95 % interval of its validation gain over KD lies above 0. Only KD's τ is chosen
again at the full budget, not LELP's point: a late-overfitting LELP point can only lose the
decision, so the asymmetry errs towards KD.

Ties on the grid are listed, and the rule that broke them is stated; S values a class is too small
for are skipped with a note. The whole curve is written to ``work_dir/tune`` (``tune.json``,
``tune.md``, ``tune.png``). Nothing is tuned on the test split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import reference
from .io.locks import ExclusiveLock
from .ops.loss import distill_loss
from .projector import LELPProjector

TIE_TOLERANCE = 1e-9  # mean validation accuracies closer than this are a tie (they are row counts / n)


@dataclasses.dataclass
class TuneGrid:
    subclasses: Sequence[int] = (2, 4, 8, 16)
    betas: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 1.0)
    taus: Sequence[float] = (1.0, 2.0, 4.0)
    steps: int = 500  # optimiser steps per proxy, whatever the number of rows
    # optimiser steps of the finals (KD's τ when it differs from ``steps``, then LELP against KD):
    # the student's budget; None: ``steps`` in ``search``, in ``tune`` the run config's epochs x
    # batches per epoch of the rows the proxies see
    final_steps: Optional[int] = None
    evals: int = 10  # validation evaluations per proxy, evenly spaced
    # which of them scores a proxy: "best", as `distill` keeps its best epoch; "last", for a student
    # kept as it ends (one that overfits late scores far lower so)
    keep: str = "best"
    seeds: int = 3  # proxies per grid point; as many fresh seeds judge LELP against KD
    fraction: float = 1.0  # of the training rows the proxies see
    # λ (1: the paper's LELP; 0: KD on the pooled student, β moot); None: the library's default
    # (reference.DEFAULT_SUBCLASS_WEIGHT with KL, 1 with another divergence)
    subclass_weights: Sequence[Optional[float]] = (None,)

    def check(self) -> None:
        for name in ("steps", "evals", "seeds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"grid.{name} (--{name}) must be a positive integer, got {value!r}")
        if self.final_steps is not None and (not isinstance(self.final_steps, int) or self.final_steps < 1):
            raise ValueError(f"grid.final_steps (--final-steps) must be a positive integer or None, "
                             f"got {self.final_steps!r}")
        if self.keep not in ("best", "last"):
            raise ValueError(f"grid.keep (--keep) must be 'best' or 'last', got {self.keep!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"grid.fraction (--fraction) must lie in (0, 1], got {self.fraction!r}")
        if any(not isinstance(s, int) or s < 2 for s in self.subclasses):
            raise ValueError(f"grid.subclasses (--subclasses) must be integers >= 2 (S = 1 is the KD arm, always run), "
                             f"got {list(self.subclasses)}")
        for name, values in (("taus", self.taus), ("betas", self.betas)):
            if (name == "taus" and not values) or any(not 0 < v < math.inf for v in values):
                empty = " and non-empty" if name == "taus" else ""
                raise ValueError(f"grid.{name} (--{name}) must be positive finite numbers{empty}, got {list(values)}")
        if not self.subclass_weights or any(w is not None and not w >= 0 for w in self.subclass_weights):
            raise ValueError(f"grid.subclass_weights (--subclass-weights) must be non-empty and >= 0, "
                             f"got {list(self.subclass_weights)}")


@dataclasses.dataclass
class ProxySettings:
    """How a proxy trains: the run config's ``train`` section (its lr, batch, loss)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    divergence: str = "kl"
    jsd_beta: float = 0.5
    alpha: float = 0.0
    seed: int = 0

    @classmethod
    def from_train(cls, train) -> "ProxySettings":
        return cls(**{f.name: getattr(train, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class TeacherOutputs:
    """The teacher's side of the training rows: embeddings (N, d), class logits (N, C), labels
    (N,) and its head ``(W, b)`` (None: no null-space projection). The student's inputs are
    separate, so they need not be what the teacher read."""

    embeddings: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    head: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


# ----------------------------------------------------------------------------- proxies


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches: shuffled passes over ``n`` rows, repeated as often as needed."""
    done = 0
    while done < steps:
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            if done == steps:
                return
            yield idx
            done += 1


def proxy_curve(make_student: Callable, x, y, log_t, val_x, val_y, c: int, s: int, tau: float,
                settings: ProxySettings, steps: int, evals: int, seed: int,
                subclass_weight: float = 1.0) -> List[float]:
    """Validation accuracy of one proxy (pooled at τ) at ``evals`` evenly spaced steps."""
    torch.manual_seed(seed)
    student = make_student(c * s)
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    checkpoints = {math.ceil((i + 1) * steps / evals) for i in range(evals)}
    curve = []
    for step, idx in enumerate(_batches(x.shape[0], settings.batch_size, steps, torch.Generator().manual_seed(seed)),
                               start=1):
        student.train()
        loss = distill_loss(student(x[idx]), log_t[idx], y[idx], num_classes=c, n_subclasses=s,
                            divergence=settings.divergence, jsd_beta=settings.jsd_beta, tau=tau,
                            alpha=settings.alpha, subclass_weight=subclass_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in checkpoints:
            student.eval()
            with torch.no_grad():
                pooled = reference.class_logits(student(val_x), c, s, tau)
            curve.append(float((pooled.argmax(1) == val_y).double().mean()))
    return curve


def split_validation(val, seed: int):
    """Two disjoint random halves of the validation rows ``(x, y)``, each class split evenly between
    them: the grid and KD's τ are chosen on the first, the choice is judged on the second (one row:
    both are that row)."""
    x, y = val
    if x.shape[0] < 2:
        return (x, y), (x, y)
    g = torch.Generator().manual_seed(seed)
    choose, judge, extra = [], [], 0
    for label in torch.unique(y):
        rows = torch.nonzero(y == label).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=g)]
        half = (rows.numel() + extra) // 2  # a class's odd row goes to alternate halves
        extra ^= rows.numel() % 2
        choose.append(rows[:half])
        judge.append(rows[half:])
    choose, judge = torch.cat(choose).sort().values, torch.cat(judge).sort().values
    return (x[choose], y[choose]), (x[judge], y[judge])


def infeasible(labels: torch.Tensor, num_classes: int, s: int) -> Optional[str]:
    """Why S cannot be fitted on these classes of the rows (a class with at most S rows), or None.
    Rows without a class (-100) are not counted."""
    labels = labels.long()
    counts = torch.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
    small = int(counts.argmin())
    if int(counts[small]) < s + 1:
        return f"class {small} has {int(counts[small])} rows, S = {s} needs at least {s + 1}"
    return None


# ----------------------------------------------------------------------------- search


def _kd_log_targets(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """S = 1 targets: ``log_softmax(z/τ)``, exactly what ``log_targets`` gives for one subclass."""
    return F.log_softmax(logits.double() / tau, dim=-1).float()


class _Search:
    """The grid's shared state: the proxies' rows, the subclass coordinates per S, the seeds."""

    def __init__(self, teacher: TeacherOutputs, train, val, make_student, settings: ProxySettings,
                 grid: TuneGrid, fit_seed: int, fit_options: dict, log: Callable[[str], None]):
        self.teacher, self.make_student, self.settings, self.grid, self.log = teacher, make_student, settings, grid, log
        x, y = train
        self.choose_val, self.judge_val = split_validation(val, settings.seed)
        n = x.shape[0]
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
        self.rows = rows[:max(1, int(grid.fraction * n))]
        self.x, self.y = x[self.rows], y[self.rows]
        self.c = int(teacher.logits.shape[1])
        self.fit_seed, self.fit_options = fit_seed, fit_options
        # the classes the fit splits: the labels, or the teacher's argmax with assign="teacher"
        self.classes = teacher.logits.argmax(1) if fit_options.get("assign") == "teacher" else teacher.labels
        self.coords = {}  # S -> the proxies' rows' subclass coordinates u (N_rows, C*S)

    def fit(self, s: int) -> Optional[str]:
        """Fits the projector for S (keeps its coordinates); returns why S is infeasible, or None."""
        t = self.teacher
        why = infeasible(self.classes, self.c, s)
        if why is None:
            w, b = t.head if t.head is not None else (None, None)
            # the logits only where the classes are the teacher's and no head gives them
            logits = t.logits if w is None and self.fit_options.get("assign") == "teacher" else None
            try:
                projector = LELPProjector(s, seed=self.fit_seed, **self.fit_options).fit(
                    t.embeddings, t.labels, teacher_logits=logits, head_weight=w, head_bias=b, num_classes=self.c)
            except ValueError as exc:  # e.g. a class whose embeddings span fewer than S directions
                return str(exc)
            self.coords[s] = projector.project(t.embeddings[self.rows])
        return why

    def log_targets(self, s: int, beta: Optional[float], tau: float) -> torch.Tensor:
        z = self.teacher.logits[self.rows]
        if s == 1:
            return _kd_log_targets(z, tau)
        # λ = 0 reads only the class marginals logsumexp_s(log t), which β does not change.
        return reference.log_targets(self.coords[s], z, s, 1.0 if beta is None else beta, tau).float()

    @property
    def final_steps(self) -> int:
        return self.grid.final_steps or self.grid.steps

    def seed_block(self, block: int) -> List[int]:
        """The grid's seeds (block 0), the decision's (1), KD's finals' (2): disjoint sets."""
        first = self.settings.seed + block * self.grid.seeds
        return list(range(first, first + self.grid.seeds))

    def scores(self, s: int, beta: Optional[float], tau: float, seeds: Sequence[int],
               weight: float = 1.0, steps: Optional[int] = None, judge: bool = False) -> List[float]:
        """Each seed's proxy, trained ``steps`` (default: the grid's), at its best or last evaluation on the
        validation rows that choose (or, with ``judge``, on those that judge the choice)."""
        log_t = self.log_targets(s, beta, tau)
        val_x, val_y = self.judge_val if judge else self.choose_val
        pick = max if self.grid.keep == "best" else (lambda curve: curve[-1])
        return [pick(proxy_curve(self.make_student, self.x, self.y, log_t, val_x, val_y, self.c, s, tau,
                                 self.settings, steps or self.grid.steps, self.grid.evals, seed, weight))
                for seed in seeds]

    def point(self, s: int, beta: Optional[float], tau: float, weight: float = 1.0) -> dict:
        seeds = self.seed_block(0)
        per_seed = self.scores(s, beta, tau, seeds, weight)
        record = {"subclasses": s, "beta": beta, "tau": tau, "subclass_weight": weight,
                  "val_accuracy": sum(per_seed) / len(per_seed), "per_seed": per_seed}
        self.log(f"[tune] {point_name(record)}: validation accuracy {record['val_accuracy']:.4f} "
                 f"(mean of {len(seeds)} seeds, each at its {self.grid.keep} evaluation)")
        return record


def _tie_key(r: dict):
    """Among equal scores, the point closest to KD: fewest subclasses, least subclass weight, flattest
    split, lowest τ."""
    return (r["subclasses"], r["subclass_weight"], -(r["beta"] or 0.0), r["tau"])


def best_with_ties(records: Sequence[dict]) -> Tuple[Optional[dict], List[dict]]:
    """The best record by mean validation accuracy, and every record tied with it (itself included)."""
    if not records:
        return None, []
    top = max(r["val_accuracy"] for r in records)
    ties = sorted((r for r in records if top - r["val_accuracy"] <= TIE_TOLERANCE), key=_tie_key)
    return ties[0], ties


def _final_kd(search: _Search, kd_proxy: dict) -> Tuple[dict, List[dict]]:
    """KD's τ chosen by students trained for the final budget on fresh seeds (the proxies' choice when
    the budgets are equal); returns the chosen record and every τ's."""
    steps = search.final_steps
    if steps == search.grid.steps:
        return kd_proxy, []
    seeds = search.seed_block(2)
    finals = []
    for tau in search.grid.taus:
        per_seed = search.scores(1, None, tau, seeds, steps=steps)
        finals.append({"subclasses": 1, "beta": None, "tau": tau, "subclass_weight": 1.0, "steps": steps,
                       "val_accuracy": sum(per_seed) / len(per_seed), "per_seed": per_seed, "seeds": seeds})
        search.log(f"[tune] KD tau={tau}, {steps} steps: validation accuracy {finals[-1]['val_accuracy']:.4f} "
                   f"(mean of {len(seeds)} fresh seeds)")
    chosen, _ = best_with_ties(finals)
    return chosen, finals


def _decide(search: _Search, kd: dict, lelp: Optional[dict]) -> dict:
    """LELP only when its paired validation gain over KD, trained for the final budget on fresh seeds, is
    above 0 with 95 % confidence."""
    from .paired import format_difference, paired_interval

    if lelp is None:
        return {"choice": "KD", "reason": "no S of the grid could be fitted"}
    seeds, steps = search.seed_block(1), search.final_steps  # fresh: the seeds that chose them do not judge them
    kd_scores = search.scores(1, None, kd["tau"], seeds, steps=steps, judge=True)
    lelp_scores = search.scores(lelp["subclasses"], lelp["beta"], lelp["tau"], seeds, lelp["subclass_weight"], steps,
                                judge=True)
    stats = paired_interval(lelp_scores, kd_scores)
    win = stats["interval"] is not None and stats["interval"][0] > 0
    text = (f"({point_name(lelp)} against KD tau={kd['tau']}, {len(seeds)} fresh seeds, {steps} steps) "
            f"{format_difference(stats)}")
    if stats["interval"] is None:
        reason = f"LELP minus KD on validation {text}: one seed cannot separate a gain from noise, KD kept"
    elif win:
        reason = f"LELP minus KD on validation {text}: the interval is above 0"
    else:
        reason = f"LELP minus KD on validation {text}: the interval includes 0 or less, KD kept"
    return {"choice": "LELP" if win else "KD", "reason": reason, "seeds": seeds, "steps": steps,
            "kd_per_seed": kd_scores, "lelp_per_seed": lelp_scores, "gain": stats}


def search(teacher: TeacherOutputs, train, val, make_student: Callable, settings: ProxySettings = ProxySettings(),
           grid: TuneGrid = TuneGrid(), *, fit_seed: int = 0, fit_options: Optional[dict] = None,
           log: Callable[[str], None] = print) -> dict:
    """The grid with its KD arm, the ties and the decision, on in-memory tensors.

    ``train`` / ``val`` are the student's ``(inputs, labels)``; ``teacher`` holds the teacher's
    outputs for the same training rows, in order (its inputs may differ from the student's).
    ``fit_options``: the projector's other settings (``LELPProjector``'s ``rotate``, ``null_space``,
    ``standardize``, ``assign``, ``method``...), as the run that trains the choice will fit it.
    """
    grid.check()
    fit_options = dict(fit_options or {})
    _check_rows(teacher, *train)
    if fit_options.get("assign", "label") == "label":
        _check_labels(teacher.labels, int(teacher.logits.shape[1]))
    state = _Search(teacher, train, val, make_student, settings, grid, fit_seed, fit_options, log)
    _announce(state, log)
    results = [state.point(1, None, tau) for tau in grid.taus]
    skipped = []
    for s in grid.subclasses:
        why = state.fit(s)
        if why is not None:
            skipped.append({"subclasses": s, "reason": why})
            log(f"[tune] S={s} skipped: {why}")
            continue
        weights = dict.fromkeys(reference.resolve_subclass_weight(w, settings.divergence) for w in grid.subclass_weights)
        for weight in weights:
            betas = grid.betas if weight > 0 else [None]
            results += [state.point(s, beta, tau, weight) for beta in betas for tau in grid.taus]
    kd_proxy, kd_ties = best_with_ties([r for r in results if r["subclasses"] == 1])
    lelp, lelp_ties = best_with_ties([r for r in results if r["subclasses"] > 1])
    kd, kd_finals = _final_kd(state, kd_proxy)
    decision = _decide(state, kd, lelp)
    best = lelp if decision["choice"] == "LELP" else kd
    ties = {"kd": kd_ties if len(kd_ties) > 1 else [], "lelp": lelp_ties if len(lelp_ties) > 1 else [],
            "rule": "among tied points, the one closest to KD: fewest subclasses, then lowest lambda, then largest "
                    "beta, then lowest tau"}
    summary = {"best": best, "kd": kd, "kd_proxy": kd_proxy, "kd_finals": kd_finals, "lelp": lelp,
               "decision": decision, "ties": ties, "skipped": skipped, "results": results,
               "grid": dataclasses.asdict(grid)}
    for line in summary_lines(summary):
        log(f"[tune] {line}")
    return summary


def _announce(state: _Search, log: Callable[[str], None]) -> None:
    """What the finals will train, and a warning when the judging half is small."""
    grid, judged = state.grid, int(state.judge_val[1].shape[0])
    kd_finals = len(grid.taus) if state.final_steps != grid.steps else 0
    log(f"[tune] validation rows: {int(state.choose_val[1].shape[0])} choose, {judged} judge; finals: "
        f"{(kd_finals + 2) * grid.seeds} students of {state.final_steps} steps after the proxies of {grid.steps}")
    if judged < 50:
        log(f"[tune] warning: {judged} validation rows judge LELP against KD; accuracy moves in steps of "
            f"{100 / max(judged, 1):.1f} points there, so the interval will be wide")


def _check_rows(teacher: TeacherOutputs, x: torch.Tensor, y: torch.Tensor) -> None:
    n = teacher.embeddings.shape[0]
    if x.shape[0] != n or teacher.logits.shape[0] != n or teacher.labels.shape[0] != n:
        raise ValueError(f"teacher: {n} rows of embeddings, {teacher.logits.shape[0]} of logits, but the student's "
                         f"training data has {x.shape[0]}; they must be the same rows, in the same order")
    differ = torch.nonzero(teacher.labels.long() != y.long())
    if differ.numel():
        row = int(differ[0, 0])
        raise ValueError(f"teacher.labels[{row}] = {int(teacher.labels[row])} but the student's label is "
                         f"{int(y[row])}: the teacher's outputs must be for the student's rows, in order")


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """A fit by label needs a class for every row: named here, before any proxy trains."""
    bad = torch.nonzero((labels.long() < 0) | (labels.long() >= num_classes)).flatten()
    if bad.numel():
        row = int(bad[0])
        hint = " (a row without a label: set fit.assign: teacher to fit by the teacher's classes)" \
            if int(labels[row]) == -100 else ""
        raise ValueError(f"teacher.labels[{row}] = {int(labels[row])} is out of range: a fit by label needs "
                         f"labels in [0, {num_classes - 1}]{hint}")


def point_name(r: dict) -> str:
    """A grid point as the log and advice name it."""
    if r["subclasses"] == 1:
        return f"KD (S=1) tau={r['tau']}"
    beta = "" if r["beta"] is None else f" beta={r['beta']}"
    return f"S={r['subclasses']}{beta} tau={r['tau']} lambda={r['subclass_weight']}"


def summary_lines(summary: dict) -> List[str]:
    """The decision, its interval, the ties and the skipped S values, one sentence each."""
    best, d = summary["best"], summary["decision"]
    budget = best.get("steps", summary["grid"]["steps"])
    lines = [f"choice: {point_name(best)} (validation accuracy {best['val_accuracy']:.4f} on the choosing half, "
             f"{budget} steps); {d['reason']}"]
    if summary.get("kd_finals"):
        taus = ", ".join(f"tau={r['tau']} {r['val_accuracy']:.4f}" for r in summary["kd_finals"])
        lines.append(f"KD's tau from students trained {summary['kd']['steps']} steps on fresh seeds: {taus}; "
                     f"tau={summary['kd']['tau']} kept (the {summary['grid']['steps']}-step proxies preferred "
                     f"tau={summary['kd_proxy']['tau']})")
    for arm in ("kd", "lelp"):
        if summary["ties"][arm]:
            points = "; ".join(point_name(r) for r in summary["ties"][arm])
            lines.append(f"tie ({arm.upper()}) at {summary['ties'][arm][0]['val_accuracy']:.4f} between {points}; "
                         f"{summary['ties']['rule']}")
    lines += [f"S={s['subclasses']} skipped: {s['reason']}" for s in summary["skipped"]]
    return lines


# ----------------------------------------------------------------------------- the run config


def _tensors(data):
    xs, ys = zip(*[data[i] for i in range(len(data))])
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)


def _teacher_outputs(cfg, capture_dir: Optional[str], log) -> "TeacherOutputs":
    """The capture's rows and head; a damaged file of the config's own capture is recorded against its
    stage, so that the next run (or tune) repairs it, as inside ``lelp-fast run``."""
    from .capture import CaptureSource
    from .run import StageLog, damaged_output_error

    try:
        source = CaptureSource(capture_dir or os.path.join(cfg.work_dir, "capture/train"))
        t = source.tensors()
        return TeacherOutputs(t["embeddings"], t["teacher_logits"], t["labels"], source.head())
    except (ValueError, OSError) as exc:
        error = None if capture_dir else damaged_output_error(StageLog(cfg.work_dir, log), exc)
        if error is None:
            raise
        raise error from exc


def tune(cfg, grid: TuneGrid = TuneGrid(), *, capture_dir: Optional[str] = None,
         log: Callable[[str], None] = print) -> dict:
    """Tunes a run config on its validation split; returns the summary (see :func:`search`).

    The teacher's side comes from a capture of the training rows: the config's own capture stage
    (run here if needed), or ``capture_dir``, a capture made elsewhere from the teacher's own inputs
    (e.g. text for a transformer teacher) of the same rows, in order, as ``task.train``, whose items
    are the student's inputs.
    """
    from .run import run

    grid.check()  # before the teacher is trained and captured (search checks it for its own callers)
    if capture_dir is None:
        run(cfg, until="capture", log=log)
    # one tune of a work_dir at a time (both would write tune/); with capture_dir, nothing made it yet
    os.makedirs(cfg.work_dir, exist_ok=True)
    with ExclusiveLock(os.path.join(cfg.work_dir, ".lock-tune"), f"the tune of work_dir {cfg.work_dir}"):
        return _tune(cfg, grid, capture_dir, log)


def _tune(cfg, grid: TuneGrid, capture_dir: Optional[str], log: Callable[[str], None]) -> dict:
    from .run import load_task

    task = load_task(cfg)
    teacher = _teacher_outputs(cfg, capture_dir, log)
    if grid.final_steps is None:  # as many epochs as `lelp-fast run` trains, over the proxies' rows
        rows = max(1, int(grid.fraction * len(task.train)))
        grid = dataclasses.replace(grid, final_steps=run_steps(cfg.train, rows))
    summary = search(teacher, _tensors(task.train), _tensors(task.val), task.make_student,
                     ProxySettings.from_train(cfg.train), grid, fit_seed=cfg.fit.seed, fit_options=fit_options(cfg.fit),
                     log=log)
    _write(os.path.join(cfg.work_dir, "tune"), summary)
    log(f"[tune] set {advice(summary['best'])} in the config")
    return summary


def fit_options(fit) -> dict:
    """The config's fit settings, other than S, β, τ and the seed, that shape the projector: the
    proxies' projectors are fitted as ``lelp-fast run`` will fit the chosen one."""
    names = ("null_space", "rotate", "standardize", "assign", "method", "oversampling", "passes", "iteration_sample")
    return {name: getattr(fit, name) for name in names}


def advice(best: dict) -> str:
    """The config's settings for the chosen point. A λ = 0 point has no β (it reads only the class
    marginals), so ``fit.beta`` is left as it is."""
    if best["subclasses"] == 1:
        return f"fit.subclasses: 1 (KD), fit.tau and train.tau: {best['tau']}"
    beta = "" if best["beta"] is None else f"fit.beta: {best['beta']}, "
    return (f"fit.subclasses: {best['subclasses']}, {beta}train.subclass_weight: {best['subclass_weight']}, "
            f"fit.tau and train.tau: {best['tau']}")


def run_steps(train, n_rows: int) -> int:
    """The batches ``distill`` trains on ``n_rows``: epochs x batches per epoch (early stopping may stop
    it sooner; with ``grad_accumulation`` its optimiser steps are fewer and larger, the proxies'
    are not)."""
    return train.epochs * math.ceil(n_rows / train.batch_size)


def _write(out_dir: str, summary: dict) -> None:
    from .offline import shards

    os.makedirs(out_dir, exist_ok=True)
    lines = ["# lelp-fast tune", ""] + [f"- {line}" for line in summary_lines(summary)]
    lines += ["", "| S | β | τ | λ | validation accuracy (mean over seeds) | per seed |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['subclasses']} | {r['beta'] if r['beta'] is not None else '—'} | {r['tau']} | "
              f"{r['subclass_weight']} | "
              f"{r['val_accuracy']:.4f} | {', '.join(f'{v:.4f}' for v in r['per_seed'])} |"
              for r in summary["results"]]
    if summary["kd_finals"]:
        lines += ["", f"KD trained {summary['kd']['steps']} steps (the student's budget) on fresh seeds "
                  f"{summary['kd']['seeds']}:", "", "| τ | validation accuracy (mean over seeds) | per seed |",
                  "|---|---|---|"]
        lines += [f"| {r['tau']} | {r['val_accuracy']:.4f} | {', '.join(f'{v:.4f}' for v in r['per_seed'])} |"
                  for r in summary["kd_finals"]]
    shards.write_atomically(os.path.join(out_dir, "tune.md"), ("\n".join(lines) + "\n").encode())
    _plot(summary, os.path.join(out_dir, "tune.png"))
    shards.write_atomically(os.path.join(out_dir, "tune.json"),
                            (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())


def _plot(summary: dict, path: str) -> None:
    """Validation accuracy against β, one line per S, at the best LELP point's τ; KD as a level."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tau = (summary["lelp"] or summary["kd_proxy"])["tau"]
    with_beta = [r for r in summary["results"] if r["subclasses"] > 1 and r["beta"] is not None]
    lelp = summary["lelp"]
    weight = (lelp["subclass_weight"] if lelp and lelp["beta"] is not None  # a λ = 0 point has no β axis
              else max((r["subclass_weight"] for r in with_beta), default=None))
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sorted({r["subclasses"] for r in summary["results"]} - {1}):
        pts = sorted((r["beta"], r["val_accuracy"]) for r in summary["results"]
                     if r["subclasses"] == s and r["beta"] is not None and r["tau"] == tau
                     and r["subclass_weight"] == weight)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"S = {s}")
    kd = summary["kd_proxy"]  # at the proxies' budget, as the lines are
    ax.axhline(kd["val_accuracy"], color="k", linestyle="--", label=f"KD (τ = {kd['tau']})")
    ax.set(xscale="log", xlabel="β", ylabel="validation accuracy", title=f"proxy students, τ = {tau}, λ = {weight}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
