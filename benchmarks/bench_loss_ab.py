"""A/B of the CPU loss on a shared machine: the installed kernel, an older build of the extension, eager
PyTorch and torch.compile, interleaved round by round in one process so that load hits them alike.

Run: python benchmarks/bench_loss_ab.py --base /path/to/old/_C.so [--n 262144] [--shapes 2x64 16x8 ...]
     [--dtypes float32 bfloat16] [--rounds 5] [--repeats 3] [--accumulate] [--base-isa avx2]
Each round times every contender (median of --repeats calls, forward + backward, KL, tau = 2,
alpha = 0.1, offline targets; --tau another τ); the table gives the median over rounds and the [min, max] of the
per-round ratios, with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from _timing import interleaved_medians, load_build
from bench_loss import eager_loss, loss_inputs

from lelp_fast._checks import check_finite, check_log_probabilities
from lelp_fast.ops import _dispatch, _reused_buffers, distill_loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="an older build of lelp_fast/_C*.so to compare against")
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--shapes", nargs="+", default=["2x64", "16x8", "2x20", "5x8"], help="CxS")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--check", choices=["both", "on", "off"], default="both",
                    help="time lelp_fast with check_inputs on, off or both")
    ap.add_argument("--fresh-grad-too", action="store_true",
                    help="also time the installed kernel writing a fresh gradient each step (no reused "
                    "buffer), as the base always does: it separates the kernel's gain from the buffer's")
    ap.add_argument("--base-isa", choices=["avx2", "portable"],
                    help="cap the base build's instruction set (LELP_FAST_CPU_ISA, read at a build's first loss "
                    "call, after the installed build has chosen): with a copy of the installed build as --base, "
                    "an A/B of its instruction sets")
    ap.add_argument("--accumulate", action="store_true",
                    help="add each step's gradient into the existing .grad (default: .grad = None before each "
                         "step, as optimizer.zero_grad() leaves it)")
    args = ap.parse_args()
    new_ext = _dispatch.extension()
    isa = new_ext.loss_isa() if hasattr(new_ext, "loss_isa") else "?"  # the installed build chooses now
    if args.base_isa:
        os.environ["LELP_FAST_CPU_ISA"] = args.base_isa
    base_ext = load_build(args.base, "base") if args.base else None
    load0 = os.getloadavg()
    base_isa = f", base capped to {args.base_isa}" if args.base_isa else ""
    print(f"isa {isa}{base_isa}; torch {torch.__version__}, {torch.get_num_threads()} threads, N={args.n}, KL, tau={args.tau:g}, alpha=0.1, "
          f"{args.rounds} rounds x median of {args.repeats}; load average before {load0[0]:.1f}")
    for shape in args.shapes:
        c, s_ = (int(v) for v in shape.split("x"))
        k = c * s_
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            s, log_t, y = loss_inputs(args.n, k, c, dtype)

            def ours(ext, check, reuse=True):
                # A build that takes no row-flag pointer (`suspect`): its check is the former one, in
                # Python before the kernel (check_finite + check_log_probabilities), as it shipped. The base
                # writes a fresh gradient each step, as the package did before ops/_reused_buffers.py.
                old_check = check and "suspect" not in (ext.loss.__doc__ or "")  # a build with no row flags
                min_bytes = _reused_buffers.MIN_BYTES if reuse and ext is new_ext else float("inf")

                def run():
                    _dispatch._C = ext
                    saved, _reused_buffers.MIN_BYTES = _reused_buffers.MIN_BYTES, min_bytes
                    try:
                        if old_check:
                            check_finite("student_logits", s.detach())
                            check_log_probabilities("log_targets", log_t)
                        distill_loss(s, log_t, y, num_classes=c, n_subclasses=s_, tau=args.tau, alpha=0.1, backend="cpu",
                                     check_inputs=check and not old_check).backward()
                    finally:
                        _dispatch._C = new_ext
                        _reused_buffers.MIN_BYTES = saved
                return run

            contenders = {"eager": lambda: eager_loss(s, log_t, y, c, s_, args.tau, 0.1).backward()}
            if not args.no_compile:
                torch._dynamo.reset()
                compiled_fn = torch.compile(eager_loss, dynamic=False)
                contenders["compile"] = lambda: compiled_fn(s, log_t, y, c, s_, args.tau, 0.1).backward()
            checks = {"both": (True, False), "on": (True,), "off": (False,)}[args.check]
            for check in checks:
                tag = "" if check else " nocheck"
                if base_ext is not None:
                    contenders["base" + tag] = ours(base_ext, check)
                contenders["new" + tag] = ours(new_ext, check)
                if args.fresh_grad_too:
                    contenders["new fresh-grad" + tag] = ours(new_ext, check, reuse=False)
            if not args.accumulate:
                contenders = {name: _from_no_grad(s, fn) for name, fn in contenders.items()}
            times = interleaved_medians(contenders, args.rounds, args.repeats)
            peers = [p for p in ("eager", "compile") if p in times]
            cells = []
            for name, ts in times.items():
                if name in peers:
                    continue
                ratios = {p: [tp / tn for tp, tn in zip(times[p], ts)] for p in peers}
                rtxt = " ".join(f"{statistics.median(r):.2f}x {p} [{min(r):.2f}-{max(r):.2f}]" for p, r in ratios.items())
                cells.append(f"{name} {statistics.median(ts) * 1e3:.1f} ms ({rtxt})")
            ptxt = ", ".join(f"{p} {statistics.median(times[p]) * 1e3:.1f} ms" for p in peers)
            print(f"C={c} S={s_} K={k} {dtype_name}: {ptxt}; " + "; ".join(cells), flush=True)
    print(f"load average after {os.getloadavg()[0]:.1f}")


def _from_no_grad(s, step):
    """``step`` after ``s.grad = None``: every contender's backward then writes a fresh gradient."""
    def run():
        s.grad = None
        step()
    return run


if __name__ == "__main__":
    main()
