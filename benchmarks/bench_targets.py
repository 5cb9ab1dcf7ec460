"""Targets op on CPU: lelp_fast's C++ kernel vs PyTorch eager and torch.compile, with the floor.

Run: python benchmarks/bench_targets.py [--n 65536] [--d 768] [--classes 2 5] [--subclasses 8]
Prints a Markdown table: median seconds, rows/s, ratio vs eager and compile, and the floor
(one read of the embeddings at the bandwidth of a plain read pass measured in the same run).
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from _timing import median_seconds

from lelp_fast.ops import lelp_targets


def eager_targets(h, weight, bias, num_classes, s):
    """The reference formula in fp32, as a user would write it in PyTorch."""
    k = num_classes * s
    proj = torch.addmm(bias, h.float(), weight)
    log_class = F.log_softmax(proj[:, k:], dim=-1)
    log_sub = F.log_softmax(proj[:, :k].reshape(-1, num_classes, s), dim=-1)
    return (log_class.unsqueeze(-1) + log_sub).reshape(-1, k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--d", type=int, nargs="+", default=[768])
    p.add_argument("--classes", type=int, nargs="+", default=[2, 5])
    p.add_argument("--subclasses", type=int, default=8)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    args = p.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| d | K | dtype | floor (ms) | lelp_fast cpu (ms) | eager (ms) | compile (ms) "
          "| vs eager | vs compile | % of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in args.d:
        for num_classes in args.classes:
            s = args.subclasses
            k = num_classes * s
            weight = torch.randn(d, k + num_classes) / d**0.5
            bias = torch.randn(k + num_classes)
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                h = torch.randn(args.n, d).to(dtype)
                probe = torch.ones(h.numel() * h.element_size() // 4)  # same bytes, fp32, touched
                floor = median_seconds(lambda: probe.sum(), args.repeats)
                out = torch.empty(args.n, k)
                compiled = None
                if not args.no_compile:  # a fresh compile per shape: no recompile limit, no stale guards
                    torch._dynamo.reset()
                    compiled = torch.compile(eager_targets, dynamic=False)
                ours = median_seconds(lambda: lelp_targets(h, weight, bias, num_classes, s, backend="cpu",
                                                           out=out, check_inputs=False), args.repeats)
                eager = median_seconds(lambda: eager_targets(h, weight, bias, num_classes, s), args.repeats)
                comp = (median_seconds(lambda: compiled(h, weight, bias, num_classes, s), args.repeats)
                        if compiled else float("nan"))
                print(f"| {d} | {k} | {dtype_name} | {floor * 1e3:.1f} | {ours * 1e3:.1f} | {eager * 1e3:.1f} "
                      f"| {comp * 1e3:.1f} | {eager / ours:.2f}x | {comp / ours:.2f}x | {100 * floor / ours:.0f}% |",
                      flush=True)


if __name__ == "__main__":
    main()
