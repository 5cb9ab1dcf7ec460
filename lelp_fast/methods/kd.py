"""Vanilla KD (Hinton et al. 2015) and its f-divergence family (f-DISTILL), on the fused loss.

With one subclass per class, the LELP loss is exactly KD: targets ``log_softmax(z / τ)``, the
student's ``softmax(s / τ)``, the divergence scaled by τ², plus α times the hard-label CE.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import reference
from ..loss import LELPLoss


def kd_log_targets(teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hinton's soft targets in log space: ``log_softmax(z / τ)``, at τ < 1 shifted by the row's max
    first, as the loss takes the student's (z / τ overflowed: z = 1e33 at τ = 1e-6 gave NaN targets)."""
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    return reference.scaled_log_softmax(teacher_logits.float(), tau)


class KDLoss(nn.Module):
    """``τ² · D(softmax(z/τ), softmax(s/τ)) + α · CE(y, s)`` with D = KL, reverse KL, JS or TVD."""

    def __init__(self, num_classes: int, *, divergence: str = "kl", tau: float = 1.0, alpha: float = 0.0,
                 reduction: str = "mean", ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        self.tau = float(tau)
        self.loss = LELPLoss(num_classes=num_classes, n_subclasses=1, divergence=divergence, tau=tau, alpha=alpha,
                             reduction=reduction, ignore_index=ignore_index, backend=backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.loss(student_logits, kd_log_targets(teacher_logits, self.tau), labels)
