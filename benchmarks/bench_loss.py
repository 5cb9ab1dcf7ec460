"""Loss forward + backward on CPU: lelp_fast's fused kernel vs PyTorch eager and torch.compile.

Run: python benchmarks/bench_loss.py [--n 65536] [--ks 16 40 128] [--dtypes float32 bfloat16] [--forward-only]
Offline targets (N x K log-targets), KL, tau = 2, alpha = 0.1 with labels, mean reduction.
The floor: one read of the student logits and the targets plus one write of the gradient (none with
--forward-only), at the bandwidth of a plain read pass over a tensor of the same size, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from _timing import interleaved_medians, median_seconds

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
    ap.add_argument("--rounds", type=int, default=5, help="--forward-only: interleaved rounds of each contender")
    ap.add_argument("--forward-only", action="store_true",
                    help="the loss under torch.no_grad() (an evaluation loop), no backward; 'with gradient' is the "
                         "fused call that computes and writes its gradient all the same (as it did before)")
    args = ap.parse_args()
    mode = "forward only, under torch.no_grad()" if args.forward_only else "forward + backward"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={args.n}, KL, tau=2, alpha=0.1, {mode}")
    if args.forward_only:
        print("| K | dtype | floor (ms) | lelp_fast cpu (ms) | with gradient (ms) | eager (ms) | compile (ms) "
              "| vs with gradient | vs eager | vs compile |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    else:
        print("| K | dtype | floor (ms) | lelp_fast cpu (ms) | eager (ms) | compile (ms) | vs eager | vs compile |")
        print("|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        for dtype_name in args.dtypes:
            print(_row(args, k, dtype_name), flush=True)


def _row(args, k: int, dtype_name: str) -> str:
    """One table row: the fused loss, eager and torch.compile at K in dtype, next to the floor."""
    num_classes = 2 if k % 8 else k // 8
    n_sub = k // num_classes
    s, log_t, y = loss_inputs(args.n, k, num_classes, getattr(torch, dtype_name))
    # the floor: s and t read once, and the gradient written once when there is one
    nbytes = s.numel() * s.element_size() * (1 if args.forward_only else 2) + log_t.numel() * log_t.element_size()
    probe = torch.ones(nbytes // 4)
    floor = median_seconds(lambda: probe.sum(), args.repeats)
    torch._dynamo.reset()
    compiled_fn = torch.compile(eager_loss, dynamic=False)
    calls = {
        "ours": lambda: distill_loss(s, log_t, y, num_classes=num_classes, n_subclasses=n_sub, tau=2.0, alpha=0.1,
                                     backend="cpu"),
        "eager": lambda: eager_loss(s, log_t, y, num_classes, n_sub, 2.0, 0.1),
        "compile": lambda: compiled_fn(s, log_t, y, num_classes, n_sub, 2.0, 0.1),
    }
    if args.forward_only:
        return _forward_only_row(args, k, dtype_name, floor, calls)
    times = {name: median_seconds(lambda fn=fn: fn().backward(), args.repeats) for name, fn in calls.items()}
    t = times["ours"]
    return (f"| {k} | {dtype_name} | {floor * 1e3:.1f} | {t * 1e3:.1f} | {times['eager'] * 1e3:.1f} | "
            f"{times['compile'] * 1e3:.1f} | {times['eager'] / t:.2f}x | {times['compile'] / t:.2f}x |")


def _forward_only_row(args, k: int, dtype_name: str, floor: float, calls: dict) -> str:
    """The loss under torch.no_grad() against the same fused call that computes its gradient, eager and
    compile: ``--rounds`` interleaved rounds of each contender's median of ``--repeats`` calls; each
    ratio as its median over the rounds [range]."""
    contenders = {name: torch.no_grad()(fn) for name, fn in calls.items()}
    contenders["with gradient"] = calls["ours"]
    times = interleaved_medians(contenders, args.rounds, args.repeats)

    def ratio(peer):
        r = [tp / t for tp, t in zip(times[peer], times["ours"])]
        return f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]"

    ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    return (f"| {k} | {dtype_name} | {floor * 1e3:.1f} | {ms['ours']:.1f} | {ms['with gradient']:.1f} | "
            f"{ms['eager']:.1f} | {ms['compile']:.1f} | {ratio('with gradient')} | {ratio('eager')} | "
            f"{ratio('compile')} |")


if __name__ == "__main__":
    main()
