"""Exact per-class covariance statistics, accumulated chunk by chunk (DESIGN.md §2).

Per class: ``n_c``, a fixed shift ``s_c`` (the class mean of the first chunk that holds the
class), ``Σ(h − s_c)`` and ``Σ(h − s_c)(h − s_c)ᵀ``. Shifting before the outer products keeps
fp64 accumulation accurate; the statistics are additive across chunks, so the same object
serves in-memory tensors and any iterable of chunks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


class ExactClassStatistics:
    """Additive sufficient statistics for per-class means and covariances (fp64)."""

    def __init__(self, num_classes: int, dim: int, projector: Optional[torch.Tensor] = None):
        self.num_classes = num_classes
        self.dim = dim
        # Null-space projector Π (d x d fp64) applied on the fly, or None.
        self.projector = projector
        self.count = torch.zeros(num_classes, dtype=torch.int64)
        self.shift = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.has_shift = torch.zeros(num_classes, dtype=torch.bool)
        self.sum = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.gram = torch.zeros(num_classes, dim, dim, dtype=torch.float64)

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds one chunk of rows (any float dtype) with their integer labels."""
        h = embeddings.to(torch.float64)
        if self.projector is not None:
            h = h @ self.projector
        for c in range(self.num_classes):
            hc = h[labels == c]
            if hc.shape[0] == 0:
                continue
            if not self.has_shift[c]:
                self.shift[c] = hc.mean(0)
                self.has_shift[c] = True
            centred = hc - self.shift[c]
            self.count[c] += hc.shape[0]
            self.sum[c] += centred.sum(0)
            self.gram[c] += centred.T @ centred

    def moments(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-class means (C x d) and unbiased covariances (C x d x d), fp64."""
        n = self.count.to(torch.float64).clamp(min=1)
        offset = self.sum / n.unsqueeze(1)
        means = self.shift + offset
        covs = (self.gram - n[:, None, None] * offset.unsqueeze(2) * offset.unsqueeze(1)) / (
            n - 1
        ).clamp(min=1)[:, None, None]
        return means, covs
