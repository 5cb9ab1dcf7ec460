"""Fidelity metrics (Stanton et al. 2021): how closely the student matches the teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_positive
from . import reference
from .reference import class_logits


def _class_level(student_logits: torch.Tensor, num_classes: int, tau: float = 1.0) -> torch.Tensor:
    check_positive("tau", tau)  # also where the student has one output a class and τ is not used
    k = student_logits.shape[-1]
    if k == num_classes:
        return student_logits
    if k % num_classes:
        raise ValueError(
            f"student_logits has {k} outputs, not a multiple of the teacher's {num_classes} classes"
        )
    return class_logits(student_logits, num_classes, k // num_classes, tau)


def agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float = 1.0) -> float:
    """Top-1 agreement: the fraction of rows where student and teacher predict the same class.

    ``student_logits`` may carry C*S subclass outputs; they are pooled to classes by
    ``τ·logsumexp(s/τ)`` (:func:`~lelp_fast.class_logits`; pass the loss's τ). A row of NaN logits
    makes it NaN, as it does :func:`predictive_kl`.
    """
    if teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError("teacher_logits and student_logits must have the same number of rows")
    s = _class_level(student_logits, teacher_logits.shape[-1], tau)
    hits = (teacher_logits.argmax(-1) == s.argmax(-1)).double()
    unknown = teacher_logits.isnan().any(-1) | s.isnan().any(-1)  # argmax takes NaN for the largest
    return float(hits.masked_fill(unknown, float("nan")).mean())


def predictive_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float = 1.0) -> float:
    """Mean KL(teacher ‖ student) between class-level predictive distributions (nats); subclass
    outputs pooled at ``tau`` as in :func:`agreement`."""
    if teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError("teacher_logits and student_logits must have the same number of rows")
    s = _class_level(student_logits, teacher_logits.shape[-1], tau).double()
    log_p = F.log_softmax(teacher_logits.double(), -1)
    log_q = F.log_softmax(s, -1)
    # 0 · log 0 = 0: a class the teacher rules out (a logit of -inf) adds nothing (was NaN)
    return float(reference._plogp_ratio(log_p.exp(), log_p, log_q).sum(-1).mean())
