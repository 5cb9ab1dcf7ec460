"""Per-row teacher weights (N x M) for several teachers, fed to the fused loss's in-kernel mixing.

- :func:`uniform_weights`, :func:`fixed_weights`: the same weights for every row.
- :class:`InstanceTeacherWeights` (AMTML-KD style): a learned latent vector per teacher scored
  against a projection of the student's feature, softmax over teachers, trained with the student
  through the distillation loss of the mixture (torch path: the weights need gradients).
- :class:`ReinforcedTeacherSelector` (Yuan et al. 2021): per teacher a sigmoid policy over the
  state (student embedding, that teacher's class probabilities, its CE against the label); the
  sampled selection averages the selected teachers; REINFORCE with the student's loss improvement
  as reward, trained alternately with the student.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference


def uniform_weights(n: int, n_teachers: int) -> torch.Tensor:
    return torch.full((n, n_teachers), 1.0 / n_teachers)


def fixed_weights(weights: Sequence[float], n: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.ndim != 1 or not torch.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be a finite non-negative 1-D sequence with a positive sum, got {list(weights)}")
    return (w / w.sum()).expand(n, -1).contiguous()


class InstanceTeacherWeights(nn.Module):
    """``w_m(x) = softmax_m(⟨v_m, P f(x)⟩ / T)`` from the student's feature ``f(x)`` (N x F)."""

    def __init__(self, feature_dim: int, n_teachers: int, latent_dim: int = 16, temperature: float = 1.0,
                 seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.project = nn.Linear(feature_dim, latent_dim)
        self.latents = nn.Parameter(torch.randn(n_teachers, latent_dim, generator=g) * 0.1)
        self.temperature = float(temperature)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.project(features) @ self.latents.T / self.temperature, dim=1)

    @staticmethod
    def mixture_loss(student_logits: torch.Tensor, log_targets: torch.Tensor, weights: torch.Tensor, *,
                     num_classes: int, n_subclasses: int = 1, tau: float = 1.0,
                     subclass_weight: float = 1.0) -> torch.Tensor:
        """KL of the mixture ``Σ w_m t_m`` with gradients to the student *and* the weights; at
        ``subclass_weight`` λ ≠ 1 the subclass part of the KL weighted by λ, as ``LELPLoss``'s."""
        log_t = reference.mix_log_targets(log_targets.float(), weights)
        if subclass_weight != 1.0 and n_subclasses > 1:
            return reference.subclass_weighted_kl(student_logits, log_t, num_classes, n_subclasses, tau,
                                                  subclass_weight).mean()
        return reference.distillation_loss(student_logits, log_t, None, num_classes=num_classes,
                                           n_subclasses=n_subclasses, tau=tau)


class ReinforcedTeacherSelector(nn.Module):
    """Sigmoid policy per teacher over ``[student embedding, p_m, CE_m]``; REINFORCE updates."""

    def __init__(self, embedding_dim: int, num_classes: int, n_teachers: int, lr: float = 0.05, seed: int = 0):
        super().__init__()
        state = embedding_dim + num_classes + 1
        self.weight = nn.Parameter(torch.zeros(n_teachers, state))
        self.bias = nn.Parameter(torch.zeros(n_teachers))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)

    @staticmethod
    def states(student_embedding: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, M, E + C + 1): the student embedding, each teacher's probabilities and its CE (0 for
        a row without a label, -100)."""
        n, m, _ = teacher_logits.shape
        log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
        labelled = (labels >= 0).view(n, 1, 1).expand(n, m, 1)
        ce = -log_p.gather(2, labels.clamp(min=0).view(n, 1, 1).expand(n, m, 1))
        ce = torch.where(labelled, ce, torch.zeros_like(ce))
        emb = student_embedding.detach().float().unsqueeze(1).expand(n, m, -1)
        return torch.cat([emb, log_p.exp(), ce], dim=-1)

    def probabilities(self, states: torch.Tensor) -> torch.Tensor:
        """π_m(select | state), (N, M)."""
        return torch.sigmoid((states * self.weight).sum(-1) + self.bias)

    def select(self, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Samples actions (N, M) in {0, 1}; returns them and the mixing weights (the selected
        teachers averaged; rows selecting none fall back to all teachers)."""
        with torch.no_grad():
            actions = torch.bernoulli(self.probabilities(states), generator=self.generator)
        chosen = torch.where(actions.sum(1, keepdim=True) > 0, actions, torch.ones_like(actions))
        return actions, chosen / chosen.sum(1, keepdim=True)

    def update(self, states: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor) -> float:
        """One REINFORCE step: ``−mean((r − mean r) Σ_m log π(a_m | s_m))``; returns that loss."""
        p = self.probabilities(states).clamp(1e-6, 1 - 1e-6)
        log_prob = (actions * p.log() + (1 - actions) * (1 - p).log()).sum(1)
        advantage = (rewards - rewards.mean()).detach()
        loss = -(advantage * log_prob).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def per_row_ce(student_logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
               n_subclasses: int = 1) -> torch.Tensor:
    """Per-row hard-label CE on pooled class logits (the reward signal of the selector)."""
    return F.cross_entropy(reference.class_logits(student_logits, num_classes, n_subclasses), labels,
                           reduction="none")

