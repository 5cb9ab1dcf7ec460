"""The λ ≠ 1 loss that mixes teachers, with the register cap the launcher passes (``loss.max_registers``)
and without it, on a GPU. ptxas's own choice parked up to 40 B on the stack (sm_80, Triton 3.6) at
about 72 registers and 7 programs an SM; the cap of 128 keeps no stack at 96-104 registers and 4-5
programs an SM. Which runs faster is this script's question (docs/benchmarks.md, "The last two loss
spills: a register cap").

Each shape's kernel (forward and gradient, two teachers, the α term at τ = 3: HARD = 3, the form that
spilled) runs both ways in one process. Each must write every output and the two must agree to
rounding; the table also says whether they agree bitwise, as expected (the cap changes ptxas's
register allocation, not the PTX's arithmetic). Then each is timed (medians of
``triton.testing.do_bench``) next to the floor: the student, the targets, the weights and the labels
read once, the gradient and the rows written once.

    python benchmarks/loss_cap_ab_gpu.py [--csv out.csv]
    TRITON_INTERPRET=1 python benchmarks/loss_cap_ab_gpu.py --device cpu --quick   # logic only
"""

from __future__ import annotations

import csv
import sys

import torch

from _timing import device_median_ms, gpu_ab_arguments
from bench_gpu import copy_bandwidth
from lelp_fast.kernels.triton import loss

# (C, S, student dtype): the two launches that spilled (16 x 16, 4 x 64), a gathered tile (12 x 10),
# the widest class (2 x 128), and fp32 at 16 x 16; all take the cap (256 slots a row or more)
SHAPES = [(16, 16, torch.bfloat16), (4, 64, torch.bfloat16), (12, 10, torch.bfloat16), (2, 128, torch.bfloat16),
          (16, 16, torch.float32)]
TEACHERS, TAU, ALPHA, LAMBDA = 2, 3.0, 0.1, 0.1


def problem(n, c, s, dtype, device):
    g = torch.Generator(device=device).manual_seed(c * 1000 + s)
    k = c * s
    student = torch.randn(n, k, device=device, generator=g).to(dtype)
    log_t = torch.log_softmax(2 * torch.randn(n, TEACHERS, k, device=device, generator=g), -1).to(dtype)
    weights = torch.rand(n, TEACHERS, device=device, generator=g)
    weights /= weights.sum(1, keepdim=True)
    labels = torch.randint(0, c, (n,), device=device, generator=g)
    return student, log_t, weights, labels


def outputs(student):
    """(loss rows, hard rows, gradient) for a launch, filled with NaN: a kernel that skips one shows."""
    n, device = student.shape[0], student.device
    return (torch.full((n,), float("nan"), device=device), torch.full((n,), float("nan"), device=device),
            torch.full_like(student, float("nan")))


def launch(student, log_t, weights, labels, c, s, out, capped: bool) -> None:
    """loss.loss_triton as the launcher runs it, into ``out``, with the cap or without."""
    saved = loss.WEIGHTED_MAX_REGISTERS
    loss.WEIGHTED_MAX_REGISTERS = saved if capped else None
    try:
        loss.loss_triton(student, log_t, weights, labels, c, s, 0, 0.5, TAU, ALPHA, -100, *out,
                         subclass_weight=LAMBDA)
    finally:
        loss.WEIGHTED_MAX_REGISTERS = saved


def bits(t):
    """The tensor's bits as integers (NaN equal to NaN of the same bits)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def measure(c, s, dtype, n, bw, device) -> dict:
    """One shape both ways: whether every output was written and the two agree (``good``), bitwise or
    not, and each one's time beside the floor."""
    student, log_t, weights, labels = problem(n, c, s, dtype, device)
    floor = (2 * student.numel() * student.element_size() + log_t.numel() * log_t.element_size()
             + weights.numel() * 4 + labels.numel() * 8 + 2 * n * 4)  # s, t, w, y read; grad, rows written
    results = {}
    for capped in (True, False):
        results[capped] = outputs(student)
        launch(student, log_t, weights, labels, c, s, results[capped], capped)
    pairs = list(zip(results[True], results[False]))
    times = {capped: device_median_ms(lambda capped=capped: launch(student, log_t, weights, labels, c, s,
                                                                   results[capped], capped), device)
             for capped in (True, False)}
    return dict(shape=f"{c}x{s}", dtype=str(dtype).split(".")[1], floor_ms=floor / bw, capped_ms=times[True],
                uncapped_ms=times[False], bitwise=all(torch.equal(bits(a), bits(b)) for a, b in pairs),
                good=all(not a.isnan().any() and torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-5)
                         for a, b in pairs))


def main() -> int:
    args = gpu_ab_arguments(__doc__)
    n = 37 if args.quick else 1 << 20
    bw = copy_bandwidth(args.device, (1 << 22) if args.quick else (1 << 30))
    print(f"{n} rows, {TEACHERS} teachers, λ = {LAMBDA}, α = {ALPHA}, τ = {TAU}; copy bandwidth {bw / 1e9:.3f} TB/s")
    print("| C x S | dtype | floor ms | capped ms | uncapped ms | capped / uncapped | capped / floor | bitwise |")
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for c, s, dtype in SHAPES:
        row = measure(c, s, dtype, n, bw, args.device)
        table.append(row)
        print(f"| {row['shape']} | {row['dtype']} | {row['floor_ms']:.3f} | {row['capped_ms']:.3f} | "
              f"{row['uncapped_ms']:.3f} | {row['capped_ms'] / row['uncapped_ms']:.3f} | "
              f"{row['capped_ms'] / row['floor_ms']:.2f} | {row['bitwise']} |", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    differ = [row["shape"] for row in table if not row["good"]]
    if differ:
        print(f"FAIL: an output left unwritten, or the capped and uncapped kernels differ, at {differ}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
