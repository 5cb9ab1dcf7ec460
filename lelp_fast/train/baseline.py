"""The KD baseline of a run report: vanilla KD trained next to the LELP student, and the difference.

KD here is LELP with one subclass per class: an S = 1 projector's targets are exactly
``log_softmax(z/τ)`` of the same stored teacher logits (the subclass log-softmax over one entry is
0), written and trained by the same ``generate_targets`` and ``distill`` as the LELP student, on
the same rows, with the same ``TrainSettings`` (epochs, patience, batches, seed) and the same
initialisation seed. A user reads off whether LELP helped.

The difference is paired on the test rows (each row is either right for both, for one, or for
none), so its interval is the test set's sampling error of the difference; it does not contain
the seed-to-seed spread of training, which needs several runs (:func:`lelp_fast.paired.paired_interval`).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..reference import class_logits
from .loop import IGNORE_INDEX, TrainSettings, distill, evaluate, load_student
from .loop import class_labels as class_labels_of

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile: the test rows are thousands, t ≈ normal


def kd_baseline(make_student: Callable[[int], nn.Module], train_data, capture_dir: str, out_dir: str, *,
                num_classes: int, settings: TrainSettings, tau: float = 1.0, val_data=None,
                val_teacher_logits: Optional[torch.Tensor] = None, targets_dtype: str = "float32",
                check_labels: bool = True, progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """Trains the KD student in ``out_dir`` (``targets/``, ``student/``); returns its training summary
    with the trained module under ``"student"``.

    ``capture_dir`` is the capture of ``train_data``'s rows (its teacher logits are the KD targets,
    at temperature ``tau``: the LELP targets' τ); ``settings`` are the LELP student's;
    ``check_labels`` as ``distill``'s.
    """
    from ..offline import generate_targets
    from ..projector import LELPProjector
    from ..capture import CaptureSource

    source = CaptureSource(capture_dir)
    head = source.head()
    # S = 1 needs no direction: the fit only gives the projector its C and d (rotation/scaling moot).
    projector = LELPProjector(1, tau=tau, null_space=False, rotate=False, standardize=False)
    projector.fit(source, num_classes=num_classes,
                  **({} if head is None else {"head_weight": head[0], "head_bias": head[1]}))
    targets_dir = os.path.join(out_dir, "targets")
    generate_targets(projector, source, targets_dir, dtype=targets_dtype, tau=tau, progress=progress)
    torch.manual_seed(settings.seed)  # the initialisation seed the LELP student gets
    student = make_student(num_classes)
    student_dir = os.path.join(out_dir, "student")
    summary = distill(student, train_data, targets_dir, student_dir, num_classes=num_classes, n_subclasses=1,
                      val_data=val_data, val_teacher_logits=val_teacher_logits, settings=settings,
                      check_labels=check_labels, progress=progress,
                      log=lambda line: log(line.replace("[train]", "[baseline]", 1)))  # not the LELP student's
    load_student(student, student_dir)  # the best epoch's weights, also when the stage had finished before
    return {**summary, "student": student, "targets_tau": float(tau)}


def _correct(student: nn.Module, data, num_classes: int, n_subclasses: int, tau: float) -> torch.Tensor:
    """Per labelled row of ``data``: 1.0 where the pooled class prediction equals the label. Rows
    without a label (-100) are left out, as ``evaluate``'s accuracy leaves them out."""
    student.eval()
    hits = []
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=512, shuffle=False):
            y = class_labels_of("test_data", torch.as_tensor(y), num_classes, first_row=len(hits) * 512)
            pooled = class_logits(student(x).float(), num_classes, n_subclasses, tau)
            hits.append((pooled.argmax(1) == y).double()[y != IGNORE_INDEX])
    return torch.cat(hits)


def compare_with_kd(lelp_student: nn.Module, kd_student: nn.Module, test_data, *, num_classes: int,
                    n_subclasses: int, tau: float = 1.0, teacher_logits: Optional[torch.Tensor] = None) -> dict:
    """Both students' test metrics and LELP − KD accuracy, paired per test row, with its 95 % interval."""
    lelp = evaluate(lelp_student, test_data, num_classes, n_subclasses, teacher_logits=teacher_logits, tau=tau,
                    name="test_data")
    kd = evaluate(kd_student, test_data, num_classes, 1, teacher_logits=teacher_logits, tau=tau, name="test_data")
    d = _correct(lelp_student, test_data, num_classes, n_subclasses, tau) - _correct(kd_student, test_data,
                                                                                     num_classes, 1, tau)
    n = d.numel()
    mean = float(d.mean())
    half = Z_95 * math.sqrt(float(d.var(unbiased=True)) / n) if n > 1 else float("nan")
    return {"lelp": lelp, "kd": kd, "difference": {"accuracy": mean, "interval": [mean - half, mean + half],
                                                   "rows": n, "lelp_only": int((d > 0).sum()),
                                                   "kd_only": int((d < 0).sum())}}


def baseline_markdown(comparison: dict) -> str:
    """The KD row of the report's table, and a sentence on the difference and its spread."""
    kd, d = comparison["kd"], comparison["difference"]
    row = f"| KD baseline (S=1, same rows, settings, seed) | {kd['accuracy']:.4f} | "
    row += (f"{kd['agreement']:.4f} | {kd['predictive_kl']:.4f} |" if "agreement" in kd else "— | — |")
    lo, hi = (100 * v for v in d["interval"])
    verdict = ("LELP is ahead" if lo > 0 else "LELP is behind" if hi < 0 else "the difference is within the noise")
    sentence = (f"LELP minus KD: {100 * d['accuracy']:+.2f} points of test accuracy (95 % interval {lo:+.2f} to "
                f"{hi:+.2f} over the {d['rows']} test rows, paired: {d['lelp_only']} rows right only for LELP, "
                f"{d['kd_only']} only for KD); {verdict}. The interval is the test set's sampling error; "
                f"the spread between training seeds is not in it.")
    return row + "\n\n" + sentence + "\n"
