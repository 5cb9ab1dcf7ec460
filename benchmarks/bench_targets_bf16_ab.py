"""bf16 targets on CPU: an older build vs this one vs oneDNN's bf16 GEMM (torch.matmul in bf16) alone on
the same input, interleaved round by round in one process (for a shared machine).

Run: python benchmarks/bench_targets_bf16_ab.py --base /path/to/old/_C.so [--n 262144] [--d 768] [--ks 16 128]
With a head (J = K + C), C = 2, fp32 out. The GEMM peer computes h @ W in bf16 (bf16 map, one product:
less accurate than the fused op's hi + lo split, which is as accurate as the fp32 map).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _timing import load_build

from lelp_fast.ops import _dispatch, lelp_targets


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base")
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    new_ext = _dispatch.extension()
    base_ext = load_build(args.base) if args.base else None
    print(f"new path {new_ext.targets_bf16_isa()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"N={args.n}, d={args.d}; load average before {os.getloadavg()[0]:.1f}")
    for k in args.ks:
        c, s = 2, k // 2
        g = torch.Generator().manual_seed(0)
        h = torch.randn(args.n, args.d, generator=g).bfloat16()
        w = torch.randn(args.d, k + c, generator=g) / args.d**0.5
        b = torch.randn(k + c, generator=g)
        w16 = w.bfloat16()
        out = torch.empty(args.n, k)

        def fused(ext):
            def run():
                _dispatch._C = ext
                try:
                    lelp_targets(h, w, b, c, s, backend="cpu", out=out)
                finally:
                    _dispatch._C = new_ext
            return run

        contenders = {"onednn_bf16_gemm": lambda: torch.matmul(h, w16)}
        if base_ext is not None:
            contenders["base"] = fused(base_ext)
        contenders["new"] = fused(new_ext)
        for f in contenders.values():
            f()
        times = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, f in contenders.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        gemm = times["onednn_bf16_gemm"]
        cells = [f"gemm {statistics.median(gemm) * 1e3:.1f} ms"]
        for name in [n for n in contenders if n != "onednn_bf16_gemm"]:
            r = [t / tg for t, tg in zip(times[name], gemm)]
            cells.append(f"{name} {statistics.median(times[name]) * 1e3:.1f} ms = {statistics.median(r):.2f}x gemm "
                         f"[{min(r):.2f}-{max(r):.2f}]")
        if base_ext is not None:
            r = [tb / tn for tb, tn in zip(times["base"], times["new"])]
            cells.append(f"base/new {statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}]")
        print(f"K={k}: " + "; ".join(cells), flush=True)
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
