"""Issue 21 item 16: the CPU loss's thread schedule on a shared machine, A/B in one process.

Run: python benchmarks/bench_loss_schedule.py [--n 262144] [--k 16] [--rounds 7]
Alternates, call by call, the kernel's dynamic chunks (default) with the former static split
(LELP_FAST_LOSS_SCHEDULE=static, read at each call) and eager PyTorch, fp32, KL, tau = 2,
alpha = 0.1, check_inputs=False, forward + backward. Prints medians, per-round ratios and the load.
Run it twice, with OMP_WAIT_POLICY unset and =passive, to see the wait policy (it applies to torch's
pool too: one OpenMP runtime serves both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lelp_fast.ops import distill_loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    c, s_ = 2, args.k // 2
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(args.n, args.k, generator=g) * 3).requires_grad_(True)
    log_t = torch.log_softmax(torch.randn(args.n, args.k, generator=g) * 3, -1)
    y = torch.randint(0, c, (args.n,), generator=g)

    def ours(schedule):
        def run():
            os.environ["LELP_FAST_LOSS_SCHEDULE"] = schedule
            distill_loss(s, log_t, y, num_classes=c, n_subclasses=s_, tau=2.0, alpha=0.1, backend="cpu",
                         check_inputs=False).backward()
        return run

    def eager():
        s32 = s
        log_q = F.log_softmax(s32 / 2.0, dim=-1)
        kl = (log_t.exp() * (log_t - log_q)).sum(-1)
        pooled = torch.logsumexp(s32.view(-1, c, s_), dim=-1)
        (4.0 * kl + 0.1 * F.cross_entropy(pooled, y, reduction="none")).mean().backward()

    fns = {"dynamic": ours("dynamic"), "static": ours("static"), "eager": eager}
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    r = lambda a, b: [x / y for x, y in zip(times[a], times[b])]  # noqa: E731
    q = lambda v: f"{statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]"  # noqa: E731
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, N={args.n}, K={args.k}, "
          f"{torch.get_num_threads()} threads, load {load0:.1f} -> {os.getloadavg()[0]:.1f}: "
          f"dynamic {med['dynamic']:.1f} ms, static {med['static']:.1f} ms, eager {med['eager']:.1f} ms; "
          f"static/dynamic {q(r('static', 'dynamic'))}, eager/dynamic {q(r('eager', 'dynamic'))}, "
          f"eager/static {q(r('eager', 'static'))}")


if __name__ == "__main__":
    main()
