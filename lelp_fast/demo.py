"""The embedded default job: LELP vs hard labels vs vanilla KD on binarised digits (no download).

scikit-learn's bundled digits (1797 8x8 images) become a binary task, even vs odd digit, so
each class is a union of five hidden subclasses, the setting LELP is built for. Per seed:
train a teacher MLP, fit LELP on its embeddings, then train the same small student three ways
and report test accuracy and teacher-student agreement.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Dict

from .quality.runner import QualityConfig, markdown_rows, run_quality

METHODS = ("hard labels", "vanilla KD", "LELP")


@dataclass
class DemoConfig:
    seeds: int = 5
    n_subclasses: int = 4
    beta: float = 1.0
    tau: float = 1.0


def run_demo(cfg: DemoConfig, progress: bool = True) -> Dict:
    """Three rows of the quality benchmark on digits parity, one teacher, no validation split:
    ``{"config", "rows": [{method, accuracy_mean, ...}], "seconds"}``."""
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
    lines += markdown_rows(result["rows"], with_seconds=False)
    lines.append("")
    lines.append(f"wall time: {result['seconds']:.1f} s")
    return "\n".join(lines)

