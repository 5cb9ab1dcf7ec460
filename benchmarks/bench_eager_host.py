"""Host time of small loss and targets calls: the custom ops dispatched by torch (as before 2026-12-04)
against their Python functions called directly (``ops._dispatch.eager``, what eager calls now do),
interleaved in one process on the CPU backend; min / median ms a call over 12 rounds of 300 calls.

    python benchmarks/bench_eager_host.py
"""

from __future__ import annotations

import time

import torch

from lelp_fast.ops import _dispatch, distill_loss, lelp_targets


def loss_step(dtype):
    n, c, s = 256, 2, 8
    student = torch.randn(n, c * s).to(dtype).requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(n, c * s), -1)
    labels = torch.randint(0, c, (n,))

    def step():
        student.grad = None
        distill_loss(student, log_t, labels, num_classes=c, n_subclasses=s, tau=2.0, alpha=0.1, backend="cpu",
                     check_inputs=False).backward()
    return step


def targets_call():
    h, w, b = torch.randn(256, 64), torch.randn(64, 18), torch.randn(18)
    return lambda: lelp_targets(h, w, b, 2, 8, backend="cpu", check_inputs=False)


def timed(step, ways, rounds=12, calls=300) -> dict:
    """{way: [ms a call per round]}, the ways interleaved round by round."""
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way, choose in ways.items():
            _dispatch.eager = choose
            for _ in range(20):
                step()
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            times[way].append((time.perf_counter() - t0) / calls * 1e3)
    return times


def main() -> int:
    torch.manual_seed(0)
    eager = _dispatch.eager
    ways = {"dispatched": lambda op, *tensors: op, "eager": eager}
    print("| call | dispatched: min / median ms | eager: min / median ms | saved (min) |")
    print("|---|---|---|---|")
    cases = {"loss fwd+bwd, fp32, 256 x 16": loss_step(torch.float32),
             "loss fwd+bwd, bf16, 256 x 16": loss_step(torch.bfloat16),
             "targets, fp32, 256 x 64, K = 16": targets_call()}
    try:
        for name, step in cases.items():
            t = {way: sorted(v) for way, v in timed(step, ways).items()}
            cells = [f"{v[0]:.4f} / {v[len(v) // 2]:.4f}" for v in t.values()]
            print(f"| {name} | {cells[0]} | {cells[1]} | {t['dispatched'][0] - t['eager'][0]:.4f} |", flush=True)
    finally:
        _dispatch.eager = eager
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
