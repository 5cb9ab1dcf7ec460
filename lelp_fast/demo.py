"""The embedded default job: LELP vs hard labels vs vanilla KD on binarised digits (no download).

scikit-learn's bundled digits (1797 8x8 images) become a binary task, even vs odd digit, so
each class is a union of five hidden subclasses, the setting LELP is built for. Per seed:
train a teacher MLP, fit LELP on its embeddings, then train the same small student three ways
and report test accuracy and teacher-student agreement.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from torch import nn


METHODS = ("hard labels", "vanilla KD", "LELP")


@dataclass
class DemoConfig:
    seeds: int = 5
    n_subclasses: int = 4
    beta: float = 1.0
    tau: float = 1.0


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


def run_demo(cfg: DemoConfig, progress: bool = True) -> Dict:
    """Three rows of the quality benchmark on digits parity, one teacher, no validation split:
    ``{"config", "rows": [{method, accuracy_mean, ...}], "seconds"}``."""
    from .quality import QualityConfig, run_quality

    start = time.perf_counter()
    quality = QualityConfig(dataset="digits-parity", seeds=cfg.seeds, n_subclasses=cfg.n_subclasses, beta=cfg.beta,
                            tau=cfg.tau, n_teachers=1, validation_fraction=0.0)
    result = run_quality(quality, METHODS, progress=progress)
    return {"config": asdict(quality), "rows": result["rows"], "seconds": time.perf_counter() - start}


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
