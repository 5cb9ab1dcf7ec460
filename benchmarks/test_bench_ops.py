"""pytest-benchmark timings of the fused ops (run: pytest benchmarks/test_bench_ops.py).

Never part of the test suite (tests/ holds correctness); each case names its peer in its id.
"""

import pytest
import torch

from lelp_fast.ops import distill_loss, lelp_targets

N, D, C, S = 65536, 768, 2, 8
K = C * S


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return {
        "h": torch.randn(N, D, generator=g).bfloat16(),
        "w": torch.randn(D, K + C, generator=g) / D**0.5,
        "b": torch.randn(K + C, generator=g),
        "s": (torch.randn(N, K, generator=g) * 3).requires_grad_(True),
        "t": torch.log_softmax(torch.randn(N, K, generator=g), -1),
    }


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_targets(benchmark, data, backend):
    benchmark(lambda: lelp_targets(data["h"], data["w"], data["b"], C, S, backend=backend, check_inputs=False))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_loss_forward_backward(benchmark, data, backend):
    benchmark(lambda: distill_loss(data["s"], data["t"], num_classes=C, n_subclasses=S, backend=backend).backward())
