"""The embedded default job: LELP vs hard labels vs vanilla KD on binarised digits (no download).

scikit-learn's bundled digits (1797 8x8 images) become a binary task, even vs odd digit, so
each class is a union of five hidden subclasses, the setting LELP is built for. Per seed:
train a teacher MLP, fit LELP on its embeddings, then train the same small student three ways
and report test accuracy and teacher-student agreement.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .loss import LELPLoss
from .metrics import agreement, predictive_kl
from .projector import LELPProjector
from .reference import class_logits

METHODS = ("hard labels", "vanilla KD", "LELP")


@dataclass
class DemoConfig:
    seeds: int = 5
    n_subclasses: int = 4
    beta: float = 1.0
    tau: float = 1.0
    teacher_hidden: int = 256
    teacher_embedding: int = 64
    student_hidden: int = 32
    teacher_epochs: int = 300
    student_epochs: int = 300
    student_fraction: float = 0.25  # students see a quarter of the training rows
    test_fraction: float = 0.4


def load_binary_digits():
    """Digits as float32 features in [0, 1], binary labels (digit parity) and the digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    digit = torch.tensor(data.target, dtype=torch.int64)
    return x, digit % 2, digit


class MLP(nn.Module):
    """``features -> hidden -> embedding -> head``; ``embed`` exposes the final-layer embedding."""

    def __init__(self, n_in: int, hidden: int, n_out: int, embedding: Optional[int] = None):
        super().__init__()
        layers: List[nn.Module] = [nn.Linear(n_in, hidden), nn.ReLU()]
        width = hidden
        if embedding is not None:
            layers += [nn.Linear(hidden, embedding), nn.ReLU()]
            width = embedding
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_out)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _train(model: nn.Module, x: torch.Tensor, loss_fn: Callable, epochs: int, lr: float = 1e-2) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(model(x)).backward()
        opt.step()


def run_seed(seed: int, cfg: DemoConfig) -> Dict[str, Dict[str, float]]:
    """One seed: teacher, LELP fit, three students. Returns per-method metrics."""
    x, y, _ = load_binary_digits()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_test = int(cfg.test_fraction * x.shape[0])
    test, train = perm[:n_test], perm[n_test:]
    student_rows = train[: int(cfg.student_fraction * train.shape[0])]

    torch.manual_seed(seed)
    teacher = MLP(x.shape[1], cfg.teacher_hidden, 2, cfg.teacher_embedding)
    _train(teacher, x[train], lambda out: F.cross_entropy(out, y[train]), cfg.teacher_epochs)
    teacher.eval()
    with torch.no_grad():
        emb_train = teacher.embed(x[train])
        t_logits_student = teacher(x[student_rows])
        t_logits_test = teacher(x[test])
        emb_student = teacher.embed(x[student_rows])

    projector = LELPProjector(cfg.n_subclasses, beta=cfg.beta, tau=cfg.tau, seed=seed)
    projector.fit(emb_train, y[train], head_weight=teacher.head.weight, head_bias=teacher.head.bias)
    lelp_targets = projector.targets(emb_student)
    kd_targets = F.log_softmax(t_logits_student / cfg.tau, dim=-1)

    xs, ys = x[student_rows], y[student_rows]
    k = projector.n_outputs
    setups = {
        "hard labels": (2, lambda out: F.cross_entropy(out, ys)),
        "vanilla KD": (2, lambda out: LELPLoss(num_classes=2, n_subclasses=1, tau=cfg.tau)(out, kd_targets)),
        "LELP": (k, lambda out: LELPLoss(projector)(out, lelp_targets)),
    }
    results = {"teacher": {"accuracy": float((t_logits_test.argmax(1) == y[test]).double().mean())}}
    for name, (n_out, loss_fn) in setups.items():
        torch.manual_seed(seed + 1)  # the same student initialisation shape for every method
        student = MLP(x.shape[1], cfg.student_hidden, n_out)
        _train(student, xs, loss_fn, cfg.student_epochs)
        with torch.no_grad():
            out = student(x[test])
        pooled = class_logits(out, 2, n_out // 2)
        results[name] = {
            "accuracy": float((pooled.argmax(1) == y[test]).double().mean()),
            "agreement": agreement(t_logits_test, pooled),
            "predictive_kl": predictive_kl(t_logits_test, pooled),
        }
    return results


def run_demo(cfg: DemoConfig, progress: bool = True) -> Dict:
    """All seeds; returns ``{"config", "rows": [{method, accuracy_mean, ...}], "seconds"}``."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    per_seed = [run_seed(s, cfg) for s in tqdm(range(cfg.seeds), desc="demo seeds", disable=not progress)]
    rows = []
    for method in ("teacher",) + METHODS:
        row = {"method": method}
        for metric in ("accuracy", "agreement", "predictive_kl"):
            vals = [r[method][metric] for r in per_seed if metric in r[method]]
            if vals:
                row[f"{metric}_mean"] = float(np.mean(vals))
                row[f"{metric}_std"] = float(np.std(vals))
        rows.append(row)
    return {"config": cfg.__dict__, "rows": rows, "seconds": time.perf_counter() - start}


def format_markdown(result: Dict) -> str:
    cfg = result["config"]
    lines = [
        f"Binarised digits (even vs odd), {cfg['seeds']} seeds, S={cfg['n_subclasses']}, "
        f"beta={cfg['beta']}, tau={cfg['tau']}, students on {cfg['student_fraction']:.0%} of the training rows",
        "",
        "| method | test accuracy (%) | agreement with teacher (%) | predictive KL |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        acc = f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f}"
        if "agreement_mean" in row:
            agr = f"{100 * row['agreement_mean']:.2f} ± {100 * row['agreement_std']:.2f}"
            kl = f"{row['predictive_kl_mean']:.4f} ± {row['predictive_kl_std']:.4f}"
        else:
            agr = kl = "—"
        lines.append(f"| {row['method']} | {acc} | {agr} | {kl} |")
    lines.append("")
    lines.append(f"wall time: {result['seconds']:.1f} s")
    return "\n".join(lines)


def write_result(result: Dict, path: str) -> None:
    """Writes the table as Markdown (``.md``) or JSON (anything else)."""
    text = format_markdown(result) + "\n" if path.endswith(".md") else json.dumps(result, indent=2)
    with open(path, "w") as f:
        f.write(text)
