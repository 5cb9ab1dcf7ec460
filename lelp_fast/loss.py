"""``LELPLoss``: the distillation loss as an ``nn.Module`` (offline or online targets)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import reference
from ._checks import check_choice, check_positive
from .ops.loss import distill_loss
from .projector import LELPProjector


class LELPLoss(nn.Module):
    """``L = τ² · D(t, softmax(s/τ)) + α · CE(y, logsumexp-pool(s))`` (DESIGN.md §1).

    Offline: pass precomputed log-targets (``projector.targets(...)``). Online: build the loss
    with a fitted ``projector`` and pass teacher ``embeddings`` (and optionally
    ``teacher_logits``); the targets are computed on the fly, without gradient.

    Args:
        projector: fitted projector for the online mode (gives C and S too).
        num_classes, n_subclasses: C and S for the offline mode without a projector.
        divergence: "kl" (KL(t‖q), default), "reverse_kl", "js" or "tvd".
        tau: class temperature τ (also used for the targets online); default the projector's or 1.
        beta: subclass temperature β online; default the projector's.
        alpha: weight of the hard-label cross-entropy on pooled class logits (paper: 0).
        reduction: "mean" (over kept rows), "sum" or "none".
        ignore_index: rows whose label equals it contribute nothing.
        backend: "auto" (fused kernel for the tensor's device, else torch), "torch", "cpu", "cuda".
    """

    def __init__(
        self,
        projector: Optional[LELPProjector] = None,
        *,
        num_classes: Optional[int] = None,
        n_subclasses: Optional[int] = None,
        divergence: str = "kl",
        tau: Optional[float] = None,
        beta: Optional[float] = None,
        alpha: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
    ):
        super().__init__()
        check_choice("divergence", divergence, reference.DIVERGENCES)
        check_choice("reduction", reduction, reference.REDUCTIONS)
        if projector is not None:
            projector._require_fitted()
            num_classes = projector.num_classes if num_classes is None else num_classes
            n_subclasses = projector.n_subclasses if n_subclasses is None else n_subclasses
            tau = projector.tau if tau is None else tau
        if num_classes is None or n_subclasses is None:
            raise ValueError("pass a fitted projector, or num_classes and n_subclasses")
        tau = 1.0 if tau is None else tau
        check_positive("tau", tau)
        if beta is not None:
            check_positive("beta", beta)
        self.projector = projector
        self.num_classes = int(num_classes)
        self.n_subclasses = int(n_subclasses)
        self.divergence = divergence
        self.tau = float(tau)
        self.beta = beta
        self.alpha = float(alpha)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(
        self,
        student_logits: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        embeddings: Optional[torch.Tensor] = None,
        teacher_logits: Optional[torch.Tensor] = None,
        teacher_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Args:
        student_logits: (N, C*S) student outputs.
        targets: (N, C*S) log-targets (offline mode), or (N, M, C*S) for M teachers.
        labels: (N,) class labels, for α ≠ 0 and ``ignore_index``.
        embeddings: (N, d) teacher embeddings (online mode: targets computed in the kernel).
        teacher_logits: (N, C) teacher logits (online mode, optional with a stored head).
        teacher_weights: (N, M) per-row teacher weights (rows sum to 1) for M teachers' targets.
        """
        online = {}
        if targets is None:
            if embeddings is None or self.projector is None:
                raise ValueError("pass targets (offline), or embeddings with a projector-built loss (online)")
            fused_weight, fused_bias = self.projector.fused_map(with_head=teacher_logits is None)
            online = dict(embeddings=embeddings, fused_weight=fused_weight.to(embeddings.device),
                          fused_bias=fused_bias.to(embeddings.device), teacher_logits=teacher_logits,
                          beta=self.projector.beta if self.beta is None else self.beta)
            if embeddings.ndim != 2 or embeddings.shape[1] != self.projector.dim:
                raise ValueError(f"embeddings must have shape (N, {self.projector.dim}), got {tuple(embeddings.shape)}")
        elif embeddings is not None:
            raise ValueError("pass either targets or embeddings, not both")
        elif targets.shape[0] != student_logits.shape[0] or targets.shape[-1] != student_logits.shape[-1]:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} does not match student_logits {tuple(student_logits.shape)}"
            )
        return distill_loss(
            student_logits,
            None if targets is None else targets.to(student_logits.device),
            labels,
            num_classes=self.num_classes,
            n_subclasses=self.n_subclasses,
            divergence=self.divergence,
            tau=self.tau,
            alpha=self.alpha,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            teacher_weights=teacher_weights,
            backend=self.backend,
            **online,
        )

    def extra_repr(self) -> str:
        return (
            f"C={self.num_classes}, S={self.n_subclasses}, divergence={self.divergence!r}, "
            f"tau={self.tau}, alpha={self.alpha}, reduction={self.reduction!r}"
        )
