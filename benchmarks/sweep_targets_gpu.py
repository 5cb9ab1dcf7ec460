"""Times the Triton targets kernels under launch configurations other than the launcher's, on a GPU.

The H200's first run (2026-12-04, docs/benchmarks.md) measured the targets at 1.8-10x the copy floor
where the cost model read from the SASS predicted 1.00x (K = 16) to 2.7x (K = 128): this sweep measures what each
(BLOCK_N, BLOCK_D, warps, stages, class block) costs at the table's shapes, with
its registers, spills and shared memory as the driver reports them, and its error against the fp64
reference on sampled rows. The launcher's own choice is marked ``*``.

    python benchmarks/sweep_targets_gpu.py --compile I/N   # N processes side by side: fill Triton's cache
    python benchmarks/sweep_targets_gpu.py --csv out.csv   # then one process alone: time every config
    TRITON_INTERPRET=1 python benchmarks/sweep_targets_gpu.py --device cpu --quick   # logic only
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time

import torch
import triton

from lelp_fast import reference
from lelp_fast.kernels.triton import interpreting
from lelp_fast.kernels.triton import targets as tt
from lelp_fast.kernels.triton.limits import padded_grid

SHAPES = [(4 << 20, 768, 2, 8), (4 << 20, 768, 5, 8), (4 << 20, 768, 8, 16)]
QUICK_SHAPES = [(1000, 64, 2, 8), (300, 40, 8, 16)]
STREAMING = dict(block_n=(64, 128, 256), block_d=(16, 32, 64, 128), warps=(4, 8), stages=(2, 3, 4))
QUICK = dict(block_n=(64,), block_d=(64,), warps=(4,), stages=(1,))


def candidates(n, d, c, s, dtype, quick):
    """(kernel, BLOCK_N, BLOCK_D, warps, stages, C_BLOCK) to try at this shape, at
    the widest class block and at half of it. (The run of 2026-12-04 also timed a resident form, since
    removed: docs/benchmarks.md.)"""
    c_pad, s_pad = padded_grid(c, s)
    widest = tt.class_block(c_pad, s_pad, whole=True)
    out = []
    for c_block in [b for b in (widest, widest // 2) if b >= 1 and b * s_pad >= 16]:
        for bn, bd, w, st in itertools.product(*(QUICK if quick else STREAMING).values()):
            if (bn == 256 and w == 4) or (bd == 128 and st == 4):  # too many registers / shared memory
                continue
            out.append(("lelp_targets_kernel", bn, bd, w, st, c_block))
    return out


def launcher_choice(d, c, s, dtype):
    p = tt.plan(d, c, s, dtype, True)
    cfg = p.config
    return p.kernel, cfg.block_n, cfg.block_d, cfg.num_warps, cfg.num_stages, p.constexprs["C_BLOCK"]


def launch(case, h, split, c, s, out):
    """One launch of ``case`` (see ``candidates``) with the head, the launcher's persistent grid; returns
    the compiled kernel."""
    kernel, bn, bd, warps, stages, c_block = case
    c_pad, s_pad = split.c_pad, split.s_pad
    constexprs = dict(HAS_LOGITS=False, C_PAD=c_pad, S_PAD=s_pad, C_BLOCK=c_block, EXACT=(c_pad, s_pad) == (c, s),
                      BLOCK_N=bn, BLOCK_D=bd)
    groups = triton.cdiv(c, c_block)  # the class groups that hold a class
    grid = (tt.row_programs(triton.cdiv(h.shape[0], bn), h.device) * groups,)
    args = tt.kernel_args(h, split, c, s, None, 0.7, 1.3, out)
    return getattr(tt, kernel)[grid](*args, **constexprs, num_warps=warps, num_stages=stages)


def problem(n, d, c, s, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    k = c * s
    h = torch.randn(n, d, device=device, generator=g).to(dtype)
    w = torch.randn(d, k + c, device=device, generator=g) / d**0.5
    b = torch.randn(k + c, device=device, generator=g)
    return h, w, b


def sampled_reference(h, w, b, c, s, rows):
    k = c * s
    proj = h[rows].double() @ w.double() + b.double()
    return reference.log_targets(proj[:, :k], proj[:, k:], s, 0.7, 1.3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile", default=None, help="I/N: only compile this process's share, on 1024 rows")
    p.add_argument("--csv", default=None)
    args = p.parse_args()
    if interpreting():
        from lelp_fast.kernels.triton.interpreter_fix import patch_interpreter

        patch_interpreter()
    dtype = torch.bfloat16
    shapes = QUICK_SHAPES if args.quick else SHAPES
    jobs = [(shape, case) for shape in shapes for case in candidates(*shape, dtype, args.quick)]
    if args.compile:
        index, count = (int(x) for x in args.compile.split("/"))
        return compile_share(jobs[index::count], dtype, args.device)
    if args.device == "cuda":
        import triton.testing

        a = torch.empty(1 << 28, device="cuda")
        bw = 2 * a.numel() * 4 / triton.testing.do_bench(lambda: a.clone(), warmup=10, rep=50, return_mode="median")
        a = None
        print(f"copy bandwidth {bw / 1e9:.3f} TB/s; {len(jobs)} configs", flush=True)
    else:
        bw = 1e6
    rows_out = []
    print("| shape | kernel | BLOCK_N | BLOCK_D | warps | stages | C_BLOCK | ms | / floor | regs | spills | shared "
          "| max err |")
    print("|" + "---|" * 13, flush=True)
    for shape, group in itertools.groupby(jobs, key=lambda j: j[0]):
        rows_out += time_shape(shape, [case for _, case in group], dtype, args.device, bw)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
            writer.writeheader()
            writer.writerows(rows_out)
    for shape, group in itertools.groupby(rows_out, key=lambda r: r["shape"]):
        ok = [r for r in group if isinstance(r["ms"], float) and r["max_err"] <= 2e-4 + 1e-4 * r["ref_max"]]
        best = sorted(ok, key=lambda r: r["ms"])[:3]
        print(f"best at {shape}: " + "; ".join(f"{r['kernel']} {r['config']} {r['ms']:.3f} ms spills {r['spills']}"
                                                for r in best))
    return 0


def compile_share(jobs, dtype, device):
    for (n, d, c, s), case in jobs:
        h, w, b = problem(1024, d, c, s, dtype, device)
        split = tt.split_map(w, b, c, s, tt.map_dtype(dtype), True)
        out = torch.empty(1024, c * s, device=device)
        try:
            launch(case, h, split, c, s, out)
        except Exception as exc:  # noqa: BLE001 - out of resources: reported by the timing run
            print(f"{case}: {type(exc).__name__}", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return 0


def time_shape(shape, cases, dtype, device, bw):
    n, d, c, s = shape
    k = c * s
    h, w, b = problem(n, d, c, s, dtype, device)
    split = tt.split_map(w, b, c, s, tt.map_dtype(dtype), True)
    rows = torch.cat([torch.arange(0, min(n, 2048)), torch.arange(max(0, n - 2048), n)]).unique().to(device)
    want = sampled_reference(h, w, b, c, s, rows)
    out = torch.empty(n, k, device=device)
    floor = (h.numel() * h.element_size() + out.numel() * 4) / bw
    chosen = launcher_choice(d, c, s, dtype)
    results = []
    for case in cases:
        config = "/".join(str(x) for x in case[1:6]) + ("*" if case == chosen else "")
        row = dict(shape=f"{n}x{d},C={c},S={s}", kernel=case[0].replace("lelp_targets_", "").replace("_kernel", ""),
                   config=config, ms="", floor_ms=floor, regs="", spills="", shared="", max_err=float("nan"),
                   ref_max=want.abs().max().item())
        try:
            out.fill_(float("nan"))
            compiled = launch(case, h, split, c, s, out)
            row["max_err"] = (out[rows].double() - want).abs().max().item()
            if compiled is not None:  # None under the interpreter
                row.update(regs=compiled.n_regs, spills=compiled.n_spills, shared=compiled.metadata.shared)
            row["ms"] = bench(lambda: launch(case, h, split, c, s, out), device)
        except Exception as exc:  # noqa: BLE001 - out of resources, or a failed compile: one row says so
            row["ms"] = f"{type(exc).__name__}: {str(exc)[:60]}"
        results.append(row)
        ms = f"{row['ms']:.3f} | {row['ms'] / floor:.2f}" if isinstance(row["ms"], float) else f"{row['ms']} | —"
        print(f"| {row['shape']} | {row['kernel']} | {' | '.join(config.split('/'))} | {ms} | {row['regs']} | "
              f"{row['spills']} | {row['shared']} | {row['max_err']:.2g} |", flush=True)
    return results


def bench(fn, device):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


if __name__ == "__main__":
    sys.exit(main())
