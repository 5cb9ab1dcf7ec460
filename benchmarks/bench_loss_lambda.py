"""The default loss (subclass weight λ = 0.1) on the CPU: one pass of the kernel against the two
fused calls it replaced, and against λ = 1 (one call), in one process on the same inputs.

Run: python benchmarks/bench_loss_lambda.py

Forward and backward, ``.grad = None`` before each call, KL, τ = 1, labels, the default input
check; median of 200 calls at N <= 1024, of 7 at N = 262 144; two rounds, the columns interleaved.
"""

import torch

from lelp_fast.ops import distill_loss
from lelp_fast.ops.loss import subclass_weighted_loss

from _timing import median_seconds

SHAPES = [(256, 4, 4, torch.float32), (1024, 4, 4, torch.float32), (262144, 4, 4, torch.float32),
          (262144, 2, 64, torch.float32), (262144, 16, 8, torch.bfloat16)]


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| N | C x S | dtype | two calls (ms) | one pass (ms) | lambda = 1 (ms) |")
    print("|---|---|---|---|---|---|")
    for n, c, s, dtype in SHAPES:
        student = torch.randn(n, c * s).to(dtype).requires_grad_(True)
        log_t = torch.log_softmax(torch.randn(n, c * s), -1).to(dtype)
        labels = torch.randint(0, c, (n,))

        def step(loss_fn):
            def run():
                student.grad = None
                loss_fn().backward()
            return run

        two = step(lambda: subclass_weighted_loss(student, log_t, labels, subclass_weight=0.1, num_classes=c,
                                                  n_subclasses=s, backend="cpu"))
        one = step(lambda: distill_loss(student, log_t, labels, num_classes=c, n_subclasses=s, subclass_weight=0.1,
                                        backend="cpu"))
        plain = step(lambda: distill_loss(student, log_t, labels, num_classes=c, n_subclasses=s, subclass_weight=1.0,
                                          backend="cpu"))
        calls = 200 if n <= 1024 else 7
        for _ in range(2):
            row = [1e3 * median_seconds(fn, calls, warmup=3) for fn in (two, one, plain)]
            print(f"| {n} | {c} x {s} | {str(dtype)[6:]} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
