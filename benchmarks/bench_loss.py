"""Loss forward + backward on CPU: lelp_fast's fused kernel vs PyTorch eager and torch.compile.

Run: python benchmarks/bench_loss.py [--n 65536] [--ks 16 40 128] [--dtypes float32 bfloat16]
Offline targets (N x K log-targets), KL, tau = 2, alpha = 0.1 with labels, mean reduction.
The floor: one read of the student logits and the targets plus one write of the gradient, at the
bandwidth of a plain read pass over a tensor of the same size, measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _timing import median_seconds

from lelp_fast.ops import distill_loss


def eager_loss(s, log_t, y, num_classes, n_sub, tau, alpha):
    """The loss as a user writes it in PyTorch (fp32 math)."""
    s32 = s.float()
    log_q = F.log_softmax(s32 / tau, dim=-1)
    kl = (log_t.float().exp() * (log_t.float() - log_q)).sum(-1)
    pooled = torch.logsumexp(s32.view(-1, num_classes, n_sub), dim=-1)
    return (tau * tau * kl + alpha * F.cross_entropy(pooled, y, reduction="none")).mean()


def loss_inputs(n: int, k: int, num_classes: int, dtype: torch.dtype):
    """Seeded student logits (requiring grad), log-targets and labels for an N x K loss benchmark."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, k, generator=g) * 3).to(dtype).requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(n, k, generator=g) * 3, -1).to(dtype)
    return s, log_t, torch.randint(0, num_classes, (n,), generator=g)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 40, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={args.n}, KL, tau=2, alpha=0.1")
    print("| K | dtype | floor (ms) | lelp_fast cpu (ms) | eager (ms) | compile (ms) | vs eager | vs compile |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        num_classes = 2 if k % 8 else k // 8
        n_sub = k // num_classes
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            s, log_t, y = loss_inputs(args.n, k, num_classes, dtype)
            nbytes = s.numel() * s.element_size() * 2 + log_t.numel() * log_t.element_size()
            probe = torch.ones(nbytes // 4)
            floor = median_seconds(lambda: probe.sum(), args.repeats)

            def ours():
                distill_loss(s, log_t, y, num_classes=num_classes, n_subclasses=n_sub, tau=2.0, alpha=0.1,
                             backend="cpu").backward()

            def eager():
                eager_loss(s, log_t, y, num_classes, n_sub, 2.0, 0.1).backward()

            torch._dynamo.reset()
            compiled_fn = torch.compile(eager_loss, dynamic=False)

            def compiled():
                compiled_fn(s, log_t, y, num_classes, n_sub, 2.0, 0.1).backward()

            t_ours, t_eager, t_comp = (median_seconds(f, args.repeats) for f in (ours, eager, compiled))
            print(f"| {k} | {dtype_name} | {floor * 1e3:.1f} | {t_ours * 1e3:.1f} | {t_eager * 1e3:.1f} | "
                  f"{t_comp * 1e3:.1f} | {t_eager / t_ours:.2f}x | {t_comp / t_ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
