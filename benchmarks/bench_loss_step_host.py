"""Host time of a small fused loss step on the CPU backend (256 x 16, C = 2, S = 8, τ = 2, fwd + bwd,
``check_inputs=False``: the kernel is about 20 us of it), with labels and α = 0.1 and without labels;
min / median ms a step over 15 rounds of 300 steps. To compare two trees, run it under each in
alternating processes (``PYTHONPATH=OLD_TREE python benchmarks/bench_loss_step_host.py before``).

    python benchmarks/bench_loss_step_host.py [NAME]
"""

from __future__ import annotations

import sys
import time

import torch

import lelp_fast
from lelp_fast.ops import distill_loss


def step_ms(student, log_t, labels, rounds: int = 15, calls: int = 300):
    """(min, median) ms of a fwd + bwd step."""
    c, s = 2, 8

    def step():
        student.grad = None
        distill_loss(student, log_t, labels, num_classes=c, n_subclasses=s, tau=2.0,
                     alpha=0.1 if labels is not None else 0.0, backend="cpu", check_inputs=False).backward()

    for _ in range(calls):
        step()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        times.append((time.perf_counter() - t0) / calls * 1e3)
    times.sort()
    return times[0], times[len(times) // 2]


def main(name: str) -> int:
    torch.manual_seed(0)
    n, k = 256, 16
    cells = []
    for dtype in (torch.float32, torch.bfloat16):
        student = torch.randn(n, k).to(dtype).requires_grad_(True)
        log_t = torch.log_softmax(torch.randn(n, k), -1)
        labels = torch.randint(0, 2, (n,))
        for lab, what in ((labels, "labels"), (None, "no labels")):
            lo, mid = step_ms(student, log_t, lab)
            cells.append(f"{str(dtype).replace('torch.', '')} {what}: {lo:.4f} / {mid:.4f}")
    print(name, lelp_fast.__file__, " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "this tree"))
