"""The fused ops against their peers (PyTorch eager, ``torch.compile``) and their floor, one
pytest-benchmark group per problem: ``pytest benchmarks/test_bench_ops.py --benchmark-only``.

Floors: targets read h once and write N x K outputs; the loss reads s and t and writes the
gradient once. Each floor is timed as a plain pass moving exactly those bytes (``copy_`` of an
input-sized tensor plus a write of the output size) on the same device in the same session.
"""

import pytest
import torch
import torch.nn.functional as F
from bench_loss import eager_loss
from conftest import synchronize

from lelp_fast.ops import distill_loss, lelp_targets

D = 768
SHAPES = [(2, 8), (2, 64), (16, 8)]  # (C, S): K = 16, 128, 128 with short and long class segments
DTYPES = [torch.float32, torch.bfloat16]


def sweep(test):
    """Every (C, S) of SHAPES, dtype and contender (lelp_fast, its peers, the floor)."""
    for mark in (pytest.mark.parametrize("cs", SHAPES, ids=lambda cs: f"C{cs[0]}S{cs[1]}"),
                 pytest.mark.parametrize("dtype", DTYPES, ids=str),
                 pytest.mark.parametrize("who", ["lelp_fast-auto", "eager", "compile", "floor"])):
        test = mark(test)
    return test


def _rows(scale: float, base: int) -> int:
    return max(256, int(base * scale))


def _run(benchmark, device, fn):
    def call():
        fn()
        synchronize(device)

    call()  # warm-up (compilation, autotuning) outside the timing
    benchmark.pedantic(call, rounds=7, iterations=1, warmup_rounds=1)


def _floor(benchmark, device, nbytes_read: int, nbytes_written: int):
    src = torch.empty(nbytes_read // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    out = torch.empty(max(1, nbytes_written // 4), dtype=torch.float32, device=device)
    _run(benchmark, device, lambda: (dst.copy_(src), out.fill_(0.0)))


def eager_targets(h, w, b, c, s, tau=1.0, beta=0.25):
    proj = h.float() @ w + b
    u, z = proj[:, :c * s], proj[:, c * s:]
    log_p = F.log_softmax(z / tau, -1)
    return (F.log_softmax(u.view(-1, c, s) / beta, -1) + log_p[:, :, None]).reshape(-1, c * s)


_compiled = {}


def compiled(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


@sweep
def test_targets(benchmark, device, scale, cs, dtype, who):
    c, s = cs
    n = _rows(scale, 65536)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, D, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(D, c * s + c, generator=g) / D ** 0.5).to(device)
    b = torch.randn(c * s + c, generator=g).to(device)
    benchmark.group = f"targets N={n} d={D} C={c} S={s} {dtype}"
    if who == "floor":
        return _floor(benchmark, device, h.numel() * h.element_size(), n * c * s * 4)
    if who == "lelp_fast-auto":
        return _run(benchmark, device, lambda: lelp_targets(h, w, b, c, s, beta=0.25, check_inputs=False))
    fn = eager_targets if who == "eager" else compiled(eager_targets)
    _run(benchmark, device, lambda: fn(h, w, b, c, s))


@sweep
def test_loss_forward_backward(benchmark, device, scale, cs, dtype, who):
    c, s = cs
    n = _rows(scale, 262144)
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(n, c * s, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(n, c * s, generator=g), -1).to(device=device, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    benchmark.group = f"loss fwd+bwd N={n} C={c} S={s} KL tau=2 alpha=0.1 {dtype}"
    if who == "floor":
        return _floor(benchmark, device, 2 * student.numel() * student.element_size(),
                      student.numel() * student.element_size())
    if who == "lelp_fast-auto":
        step = lambda: distill_loss(student, log_t, y, num_classes=c, n_subclasses=s, tau=2.0,  # noqa: E731
                                    alpha=0.1).backward()
    else:
        fn = eager_loss if who == "eager" else compiled(eager_loss)
        step = lambda: fn(student, log_t, y, c, s, 2.0, 0.1).backward()  # noqa: E731
    _run(benchmark, device, step)
