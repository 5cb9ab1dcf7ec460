"""Annealing-KD (Jafari et al. 2021) as a schedule object usable in any training loop.

Stage I (``stage1_epochs`` epochs): regress the student's logits on the annealed teacher logits,
``MSE(s, Φ(T) · z_t)`` with ``Φ(T) = 1 − (T − 1) / τ_max``, the temperature T stepping down from
τ_max to 1 in equal stages (Φ goes from 1/τ_max to 1). Stage II: cross-entropy on hard labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class AnnealingKD:
    """``loss(epoch, student_logits, teacher_logits, labels)``; ``temperature(epoch)`` and
    ``stage(epoch)`` say where the schedule is."""

    def __init__(self, tau_max: float = 10.0, stage1_epochs: int = 100):
        if not 1 <= tau_max < math.inf:
            raise ValueError(f"tau_max must be a finite number >= 1, got {tau_max}")
        if stage1_epochs < 1:
            raise ValueError(f"stage1_epochs must be >= 1, got {stage1_epochs}")
        self.tau_max, self.stage1_epochs = float(tau_max), int(stage1_epochs)

    def stage(self, epoch: int) -> int:
        return 1 if epoch < self.stage1_epochs else 2

    def temperature(self, epoch: int) -> float:
        """T for a stage-I epoch: τ_max, ..., 1 in ⌈τ_max⌉ equal steps over the stage-I epochs; with
        fewer stage-I epochs than steps (but more than one), some steps are skipped so that the last
        epoch is at T = 1 (it ended above 1: τ_max = 4 over 3 epochs gave 4, 3, 2). One stage-I epoch
        is at τ_max."""
        steps = max(1, math.ceil(self.tau_max))
        if self.stage1_epochs >= steps:
            level = min(steps - 1, epoch * steps // self.stage1_epochs)  # 0 .. steps-1
        else:
            level = min(steps - 1, epoch * (steps - 1) // max(1, self.stage1_epochs - 1))
        return self.tau_max - (self.tau_max - 1.0) * level / max(1, steps - 1)

    def phi(self, epoch: int) -> float:
        return 1.0 - (self.temperature(epoch) - 1.0) / self.tau_max

    def loss(self, epoch: int, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        if self.stage(epoch) == 1:
            return F.mse_loss(student_logits, self.phi(epoch) * teacher_logits.detach())
        return F.cross_entropy(student_logits, labels)
