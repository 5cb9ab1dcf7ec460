"""Download-free tasks where each class is a union of hidden subclasses (LELP's setting).

Every loader returns ``(x, y, subclass)``: float32 features, class labels (0..C−1) and the hidden
subclass of each row numbered within its class (0..H−1), for the oracle variant.

- ``digits-parity``: scikit-learn's bundled 8x8 digits, even vs odd (5 digits per class);
- ``digits-low``: the same digits, 0–4 vs 5–9;
- ``hierarchical``: :func:`hierarchical`, a synthetic generator anyone can regenerate.

Real data (Fashion-MNIST, tweets) with CNN / WordLlama teachers: :mod:`.real_data`.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

Task = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _digits(grouping: str) -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    digit = torch.tensor(data.target, dtype=torch.int64)
    if grouping == "parity":
        return x, digit % 2, digit // 2
    return x, (digit >= 5).long(), digit % 5


def hierarchical(n: int = 4000, num_classes: int = 2, subclasses: int = 4, dim: int = 32, separation: float = 3.0,
                 spread: float = 1.0, noise: float = 0.05, seed: int = 0) -> Task:
    """C coarse classes, each the union of H Gaussian subclasses.

    Subclass centres are drawn N(0, separation² I) in ``dim`` dimensions, rows are centre +
    N(0, spread² I), the subclass is uniform over the C·H subclasses, and a fraction ``noise``
    of the class labels is flipped. Deterministic for a given seed; N can be millions (memory
    N·dim·4 bytes).
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes * subclasses, dim, generator=g) * separation
    fine = torch.randint(0, num_classes * subclasses, (n,), generator=g)
    x = centres[fine] + torch.randn(n, dim, generator=g) * spread
    y = fine // subclasses
    flip = torch.rand(n, generator=g) < noise
    y = torch.where(flip, torch.randint(0, num_classes, (n,), generator=g), y)
    return x, y, fine % subclasses


DATASETS: Dict[str, Callable[[], Task]] = {
    "digits-parity": lambda: _digits("parity"),
    "digits-low": lambda: _digits("low"),
    "hierarchical": hierarchical,
}
