import numpy as np
import pytest
import torch


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def make_problem(n=300, d=24, num_classes=3, seed=0, dtype=torch.float64):
    """Random embeddings with a decaying spectrum, a random head and its argmax labels."""
    g = torch.Generator().manual_seed(seed)
    scales = 1.0 / torch.arange(1, d + 1, dtype=torch.float64).sqrt()
    h = torch.randn(n, d, generator=g, dtype=torch.float64) * scales + torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(num_classes, d, generator=g, dtype=torch.float64)
    b = torch.randn(num_classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return h.to(dtype), w, b, y
