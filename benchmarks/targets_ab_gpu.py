"""The Triton targets of this tree against those of an earlier commit, on a GPU, at the grids whose
programs a change moved: each checked against the fp64 reference on sampled rows, then timed
(medians of ``triton.testing.do_bench``) next to the copy floor, before and after in one process.

    git show <commit>:lelp_fast/kernels/triton/targets.py > benchmarks/_targets_before.py
    python benchmarks/targets_ab_gpu.py --before benchmarks/_targets_before.py [--csv out.csv]
    TRITON_INTERPRET=1 python benchmarks/targets_ab_gpu.py --before ... --device cpu --quick   # logic only
"""

from __future__ import annotations

import csv
import importlib.util
import inspect
import re
import sys
import tempfile

import torch

from _timing import device_median_ms, gpu_ab_arguments
from bench_gpu import copy_bandwidth
from lelp_fast import reference
from lelp_fast.kernels.triton import kd_targets, limits
from lelp_fast.kernels.triton import targets as after

# (C, S, teacher's head or given logits, dtype): padded grids and given logits of 128 columns and
# more, which the change of 2026-12-04 took in programs of 64 columns; a class of 100 subclasses
# (padded to 128, no mask in its log-partition); the table's whole grid with the head, unchanged.
# 300 given logits of one subclass are vanilla KD since 2026-12-04 (kd_targets), which reads no h:
# the floor counted here, with h, is above its own (the logits read and the targets written).
# Since 2026-12-05 the map stores no padding class and a head of 8 columns for at most 8 (padded)
# classes: bench_gpu.py's K = 40 (5 x 8 on an 8 x 8 grid, with the head and with given logits), a
# binary head (2 x 8) and two class groups (9 x 7: 80 of 128 columns) read less of it per row tile.
# Since session 54 a whole grid with the head in fp32 (16 x 8) takes two programs of 64, not one of
# 128 at 128 x 16 x 8 x 2 (the model prefers the one; the H200 found two of 64 faster at 8 x 16
# in bf16 and 15 x 7 in fp32: targets.FP32_CONFIGS).
SHAPES = [(15, 7, True, torch.bfloat16), (8, 16, False, torch.bfloat16), (300, 1, False, torch.bfloat16),
          (2, 50, True, torch.bfloat16), (3, 100, True, torch.bfloat16), (15, 7, True, torch.float32),
          (8, 16, True, torch.bfloat16), (5, 8, True, torch.bfloat16), (5, 8, False, torch.bfloat16),
          (2, 8, True, torch.bfloat16), (9, 7, True, torch.bfloat16), (16, 8, True, torch.float32)]
BETA, TAU = 0.7, 1.3


def load_before(path: str):
    """The targets module of an earlier commit, its relative imports made absolute (Triton's JIT reads
    the kernels' source, so it is loaded from a file)."""
    text = open(path).read()
    text = re.sub(r"^(\s*)from \.\.\.(\w*)", r"\1from lelp_fast.\2", text, flags=re.M)
    text = re.sub(r"^(\s*)from \. import", r"\1from lelp_fast.kernels.triton import", text, flags=re.M)
    text = re.sub(r"^(\s*)from \.(\w+)", r"\1from lelp_fast.kernels.triton.\2", text, flags=re.M)
    f = tempfile.NamedTemporaryFile("w", suffix="_targets_before.py", delete=False)
    f.write(text)
    f.close()
    spec = importlib.util.spec_from_file_location("targets_before", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def problem(n, d, c, s, with_head, dtype, device):
    g = torch.Generator(device=device).manual_seed(c * 1000 + s)
    w = torch.randn(d, c * s + c, device=device, generator=g) / d**0.5
    b = torch.randn(c * s + c, device=device, generator=g)
    h = torch.randn(n, d, device=device, generator=g).to(dtype)
    z = None if with_head else (3 * torch.randn(n, c, device=device, generator=g)).to(dtype)
    return h, w, b, z


def sampled_error(out, h, w, b, z, c, s, rows) -> float:
    proj = h[rows].double() @ w.double() + b.double()
    logits = proj[:, c * s:] if z is None else z[rows].double()
    want = reference.log_targets(proj[:, :c * s], logits, s, BETA, TAU)
    return (out[rows].double() - want).abs().max().item()


def program(module, d, c, s, with_head, dtype) -> str:
    if limits.vanilla_kd(s, not with_head) and "kd_targets" in inspect.getsource(module.targets_triton):
        ce = kd_targets.launch_constexprs(c)
        return (f"KD: {ce['BLOCK_N']} rows x {ce['C_PAD']} cols (tail {ce['TAIL']}), {ce['LANES']} lanes, "
                f"{kd_targets.NUM_WARPS} warp")
    p = module.plan(d, c, s, dtype, with_head)
    cfg = p.config
    return (f"{p.groups} x {p.constexprs['C_BLOCK'] * p.constexprs['S_PAD']} cols, "
            f"{cfg.block_n}/{cfg.block_d}/{cfg.num_warps}/{cfg.num_stages}")


def main() -> int:
    args = gpu_ab_arguments(__doc__, lambda p: p.add_argument("--before", required=True,
                                                            help="targets.py of the earlier commit"))
    before = load_before(args.before)
    n, d = (300, 40) if args.quick else (4 << 20, 768)
    bw = copy_bandwidth(args.device, (1 << 22) if args.quick else (1 << 30))
    rows_out = []
    print(f"{n} x {d}; copy bandwidth {bw / 1e9:.3f} TB/s (read + write)")
    print("| C x S | logits | dtype | floor | before | after | after / floor | before program | after program "
          "| max error before / after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c, s, with_head, dtype in SHAPES:
        h, w, b, z = problem(n, d, c, s, with_head, dtype, args.device)
        rows = torch.cat([torch.arange(0, min(n, 2048)), torch.arange(max(0, n - 2048), n)]).unique().to(args.device)
        out = torch.empty(n, c * s, device=args.device)
        floor = (h.numel() * h.element_size() + out.numel() * 4 + (0 if z is None else z.numel() * z.element_size()))
        row = dict(shape=f"{c}x{s}", logits="given" if z is not None else "head", dtype=str(dtype).split(".")[1],
                   floor_ms=floor / bw)
        for name, module in (("before", before), ("after", after)):
            # each module's split map from its own tensors (the split is cached per weight tensor)
            def run(module=module, w=w.clone(), b=b.clone()):
                return module.targets_triton(h, w, b, c, s, z, BETA, TAU, out)
            out.fill_(float("nan"))
            run()
            row[f"{name}_err"] = sampled_error(out, h, w, b, z, c, s, rows)
            row[f"{name}_ms"] = device_median_ms(run, args.device)
            row[f"{name}_program"] = program(module, d, c, s, with_head, dtype)
        rows_out.append(row)
        print(f"| {row['shape']} | {row['logits']} | {row['dtype']} | {row['floor_ms']:.3f} | {row['before_ms']:.3f} "
              f"| {row['after_ms']:.3f} | {row['after_ms'] / row['floor_ms']:.2f} | {row['before_program']} "
              f"| {row['after_program']} | {row['before_err']:.1e} / {row['after_err']:.1e} |", flush=True)
        del h, out, z
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
            writer.writeheader()
            writer.writerows(rows_out)
    bad = [r["shape"] for r in rows_out if not r["after_err"] < 1e-3]
    if bad:
        print(f"FAIL: error over 1e-3 at {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
