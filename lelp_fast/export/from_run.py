"""Export the student a config run trained (``lelp-fast export CONFIG``).

C, S and τ are read from the training report the run wrote (``student/report.json``), so the
pooling is the one the student was trained with even when the config has been edited since.
"""

from __future__ import annotations

import os
import warnings

from ..offline import provenance
from .module import export_module


def export_run(cfg, out: str, format: str = "torch-export"):
    """Writes ``work_dir/student``'s trained student, pooled to C class logits, to ``out``."""
    from ..run import load_task
    from ..train import load_student

    student_dir = os.path.join(cfg.work_dir, "student")
    report_path = os.path.join(student_dir, "report.json")
    if not os.path.exists(report_path):
        raise FileNotFoundError(f"{report_path} does not exist: train the student first (lelp-fast train CONFIG)")
    c, s, tau = _trained_shape(report_path)
    if (s, float(tau)) != (cfg.fit.subclasses, float(cfg.train.tau)):
        warnings.warn(f"{student_dir} holds the student trained with S={s}, tau={tau}; the config now says "
                      f"fit.subclasses={cfg.fit.subclasses}, train.tau={cfg.train.tau}: exporting the trained one "
                      "(lelp-fast run CONFIG trains the config's)", stacklevel=2)
    task = load_task(cfg)
    student = load_student(task.make_student(c * s), student_dir).eval()
    x = task.train[0][0]  # one training input: its shape is what the exported graph takes
    example = tuple(t.unsqueeze(0) for t in x) if isinstance(x, (tuple, list)) else x.unsqueeze(0)
    return export_module(student, out, example, num_classes=c, n_subclasses=s, tau=tau, format=format)


def _trained_shape(report_path: str):
    """(C, S, the loss's τ) from the training report; a report without them is named as damaged."""
    report = provenance.read_json(report_path)
    report = report if isinstance(report, dict) else {}
    settings = report.get("settings") if isinstance(report.get("settings"), dict) else {}
    c, s, tau = report.get("num_classes"), report.get("n_subclasses"), settings.get("tau")
    if not (isinstance(c, int) and isinstance(s, int) and isinstance(tau, (int, float))):
        raise ValueError(f"{report_path} is damaged: it holds no num_classes, n_subclasses and settings.tau of a "
                         "training report; train the student again (lelp-fast run CONFIG --redo train)")
    return c, s, tau
