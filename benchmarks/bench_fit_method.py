"""Exact vs Nyström fit time by N at one d, interleaved in one process: where the cost model's switch belongs.

Run: python benchmarks/bench_fit_method.py [--d 768] [--ns 32768 65536 131072 262144] [--rounds 3]
In-memory fp32 rows, C = 2 classes with a 1/i spectrum each (a random basis), S = 8, default fit
settings (no head: no null-space projection) except the method. Prints per N the median fit time of
each method over the rounds, the per-round ratio exact / sketch (median [min-max]), the sketch's
captured variance vs the exact top-S (the accuracy promise: >= 0.995), and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lelp_fast import LELPProjector
from lelp_fast.fit.engine import choose_method


def problem(n, d, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    h = torch.empty(n, d)
    for c in range(num_classes):
        basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        scales = torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
        rows = int((y == c).sum())
        h[y == c] = (torch.randn(rows, d, generator=g) * scales) @ basis.T + 5.0 * torch.randn(d, generator=g)
    return h, y


def directions(p):
    return p.A.double().reshape(p.dim, p.num_classes, p.n_subclasses).permute(1, 0, 2)


def captured(p_dirs, exact_dirs, covs):
    out = []
    for c in range(covs.shape[0]):
        v, _ = torch.linalg.qr(p_dirs[c])
        w, _ = torch.linalg.qr(exact_dirs[c])
        out.append(float(torch.trace(v.T @ covs[c] @ v) / torch.trace(w.T @ covs[c] @ w)))
    return min(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--ns", type=int, nargs="+", default=[32768, 65536, 131072, 262144])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={args.d}, C=2, S=8; "
          f"load average before {os.getloadavg()[0]:.1f}")
    for n in args.ns:
        h, y = problem(n, args.d, 2)
        times = {"exact": [], "nystrom": []}
        fitted = {}
        for _ in range(args.rounds):
            for method in times:
                t0 = time.perf_counter()
                fitted[method] = LELPProjector(8, method=method, rotate=False).fit(h, y)
                times[method].append(time.perf_counter() - t0)
        h64 = h.double()
        covs = torch.stack([torch.cov(h64[y == c].T) for c in range(2)])
        ratio = [te / ts for te, ts in zip(times["exact"], times["nystrom"])]
        print(f"N={n}: exact {statistics.median(times['exact']):.2f} s, nystrom {statistics.median(times['nystrom']):.2f} s, "
              f"exact/nystrom {statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}], "
              f"sketch captures {captured(directions(fitted['nystrom']), directions(fitted['exact']), covs):.4f} of exact; "
              f"auto picks {choose_method('auto', args.d, 2, n_rows=n)}; load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
