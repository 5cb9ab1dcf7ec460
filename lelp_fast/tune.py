"""``lelp-fast tune``: choose S, β and τ on the validation split with cheap proxy students.

One projector fit per S; for each S the compact targets (the coordinates ``u`` and the teacher's
logits ``z``) are computed once, so every (β, τ) only re-runs the two log-softmaxes. Each grid point
trains a proxy: the config's student, for ``epochs`` epochs on a ``fraction`` of the training rows.
The choice is the best validation accuracy (pooled at that τ); the whole curve is reported
(``tune/tune.json``, ``tune.md``, ``tune.png`` in ``work_dir``). Nothing is tuned on the test split.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from . import reference
from .capture import CaptureSource
from .config import RunConfig
from .offline import shards
from .ops.loss import distill_loss
from .projector import LELPProjector
from .run import load_task, run


@dataclasses.dataclass
class TuneGrid:
    subclasses: Sequence[int] = (2, 4, 8, 16)
    betas: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 1.0)
    taus: Sequence[float] = (1.0, 2.0, 4.0)
    epochs: int = 3
    fraction: float = 0.5


def _tensors(data):
    xs, ys = zip(*[data[i] for i in range(len(data))])
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)


def _proxy_accuracy(make_student, x, y, log_t, val_x, val_y, c, s, tau, cfg: RunConfig, epochs: int) -> float:
    torch.manual_seed(cfg.train.seed)
    student = make_student(c * s)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    order = torch.Generator().manual_seed(cfg.train.seed)
    for _ in range(epochs):
        for idx in DataLoader(range(x.shape[0]), batch_size=cfg.train.batch_size, shuffle=True, generator=order):
            loss = distill_loss(student(x[idx]), log_t[idx], y[idx], num_classes=c, n_subclasses=s,
                                divergence=cfg.train.divergence, jsd_beta=cfg.train.jsd_beta, tau=tau,
                                alpha=cfg.train.alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pooled = reference.class_logits(student(val_x), c, s, tau)
    return float((pooled.argmax(1) == val_y).double().mean())


def tune(cfg: RunConfig, grid: TuneGrid = TuneGrid(), *, log: Callable[[str], None] = print) -> dict:
    """Runs the capture stage if needed, then the grid; returns {"best": …, "results": […]}."""
    run(cfg, until="capture", log=log)
    task = load_task(cfg)
    source = CaptureSource(os.path.join(cfg.work_dir, "capture/train"))
    t, (w, b) = source.tensors(), source.head()
    x, y = _tensors(task.train)
    val_x, val_y = _tensors(task.val)
    rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.train.seed))
    rows = rows[:max(1, int(grid.fraction * x.shape[0]))]
    c = int(w.shape[0])
    results = []
    for s in grid.subclasses:
        projector = LELPProjector(s, seed=cfg.fit.seed).fit(t["embeddings"], t["labels"], head_weight=w, head_bias=b)
        u = projector.project(t["embeddings"])  # the compact form: fit once per S
        for beta in grid.betas:
            for tau in grid.taus:
                log_t = reference.log_targets(u[rows], t["teacher_logits"][rows], s, beta, tau).float()
                acc = _proxy_accuracy(task.make_student, x[rows], y[rows], log_t, val_x, val_y, c, s, tau, cfg,
                                      grid.epochs)
                results.append({"subclasses": s, "beta": beta, "tau": tau, "val_accuracy": acc})
                log(f"[tune] S={s} beta={beta} tau={tau}: validation accuracy {acc:.4f}")
    best = max(results, key=lambda r: r["val_accuracy"])
    summary = {"best": best, "results": results, "grid": dataclasses.asdict(grid)}
    _write(os.path.join(cfg.work_dir, "tune"), summary)
    log(f"[tune] best: S={best['subclasses']}, beta={best['beta']}, tau={best['tau']} "
        f"(validation accuracy {best['val_accuracy']:.4f}); set them in the config's fit/train sections")
    return summary


def _write(out_dir: str, summary: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    best = summary["best"]
    lines = ["# lelp-fast tune", "", f"best: S = {best['subclasses']}, β = {best['beta']}, τ = {best['tau']} "
             f"(validation accuracy {best['val_accuracy']:.4f})", "", "| S | β | τ | validation accuracy |",
             "|---|---|---|---|"]
    lines += [f"| {r['subclasses']} | {r['beta']} | {r['tau']} | {r['val_accuracy']:.4f} |" for r in summary["results"]]
    shards.write_atomically(os.path.join(out_dir, "tune.md"), ("\n".join(lines) + "\n").encode())
    _plot(summary, os.path.join(out_dir, "tune.png"))
    shards.write_atomically(os.path.join(out_dir, "tune.json"),
                            (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())


def _plot(summary: dict, path: str) -> None:
    """Validation accuracy against β, one line per S, at the best τ."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tau = summary["best"]["tau"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sorted({r["subclasses"] for r in summary["results"]}):
        pts = sorted((r["beta"], r["val_accuracy"]) for r in summary["results"]
                     if r["subclasses"] == s and r["tau"] == tau)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"S = {s}")
    ax.set(xscale="log", xlabel="β", ylabel="validation accuracy", title=f"proxy students, τ = {tau}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
