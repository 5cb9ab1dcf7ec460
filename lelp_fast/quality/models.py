"""The small MLPs the quality benchmark (and the demo) train as teachers and students."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn


class MLP(nn.Module):
    """``features -> hidden -> embedding -> head``; ``embed`` exposes the final-layer embedding."""

    def __init__(self, n_in: int, hidden: int, n_out: int, embedding: Optional[int] = None):
        """``hidden = 0`` (and no embedding): a linear model, whose "embedding" is its input."""
        super().__init__()
        layers: List[nn.Module] = [nn.Linear(n_in, hidden), nn.ReLU()] if hidden else []
        width = hidden or n_in
        if embedding is not None:
            layers += [nn.Linear(hidden, embedding), nn.ReLU()]
            width = embedding
        self.body = nn.Sequential(*layers) if layers else nn.Identity()
        self.head = nn.Linear(width, n_out)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
