"""Triton kernel of the targets of one subclass per class with the teacher's logits given: vanilla KD.

With S = 1 the subclass log-softmax is over one value, so ``log t = log_softmax(z / τ)``
(docs/algorithm.md): the embeddings and the map are not read. The LELP kernel (``targets.py``) read
all of h and took the class log-partition once per program of 64 classes: on an H200 the 4 M x 768
bf16 launch with 300 given logits took 29.9 ms, 9.1x the floor of reading h, the logits and writing
the output. This kernel reads each row of logits once and writes its targets once.

A program takes ``BLOCK_N`` whole rows (``TILE_ELEMENTS / C_PAD``) in registers: a
row's maximum, log-partition and output, no loop. A row is padded to its first ``C_PAD / 2`` columns
and ``TAIL`` chunks of ``LANES`` after them (``launch_constexprs``), not to ``C_PAD``: 17 classes take
24 columns, not 32. Every entry of ``VARIANTS`` is compiled ahead of time for sm_80/sm_90 and gated like
the other kernels (``tests/test_triton_aot.py``: shared memory, spills, modelled time against the floor).
"""

from __future__ import annotations

import itertools
from typing import List

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from . import gated, limits
from .fast_math import FAST_MATH

NEG_INF = tl.constexpr(float("-inf"))
# One warp a program, at most 32 values a thread: a row's reductions never leave the warp. With 4 warps
# Triton 3.6 spread rows of 64-512 classes over the warps (through shared memory: 40-63 SASS
# instructions an element at C = 63-300 where one warp takes 22-31; sm_90, 2026-12-04); 3.9 did not.
# The widest row, 512 classes, is 2 rows a program.
TILE_ELEMENTS = 1024
NUM_WARPS = 1
# Rows a launch takes, so that the kernel's row index stays in int32 (in int64 it took 4 more SASS
# instructions an element at C = 2, sm_90, 2026-12-04); more rows take several launches.
ROW_CHUNK = limits.ROW_CHUNK


def tile(num_classes: int):
    """(C_PAD, BLOCK_N) of a launch: a power of two of at least two columns, the rows of a tile."""
    c_pad = 1 << max(1, (num_classes - 1).bit_length())
    return c_pad, max(1, TILE_ELEMENTS // c_pad)


def lanes(num_classes: int, c_pad: int) -> int:
    """LANES of a launch, the columns of a chunk: a quarter of the row, at least 2 and at most a warp
    (rows of 3-31 classes across C_PAD lanes took 38-47 SASS an element, sm_90, and 20-31 so). Whole
    rows of 64 or more classes take LANES = C_PAD: 16-byte vector loads. Rows of 65-80 take 16, not 32:
    a row over the warp took 5 levels of shuffles each for 8 rows (31.8 SASS a class at C = 65, 1.29x
    the H200's floor by issue); on 16, 4 levels for two rows at once (22.2, 1.00x), while the 128-byte
    lines its loads and stores touch, at one a clock per SM, take 0.88x the floor's time (0.63x on 32;
    0.84x at C = 17, 8 lanes). docs/benchmarks.md: "KD rows of 65-80 classes on 16 lanes"."""
    if num_classes == c_pad and c_pad >= 64:
        return c_pad
    return 16 if c_pad == 128 and num_classes <= 80 else min(32, max(2, c_pad // 4))


def tail(num_classes: int, c_pad: int, lanes_: int) -> int:
    """TAIL of a launch: the chunks of ``lanes_`` columns a row takes past its first ``c_pad / 2`` (a
    power of two, fewer than half the row's chunks), or 0 where the row is one piece of ``c_pad``."""
    chunks = c_pad // lanes_
    needed = -(-(num_classes - c_pad // 2) // lanes_)
    if needed < 1:  # one class in two columns
        return 0
    fewest = 1 << (needed - 1).bit_length()
    return fewest if fewest < chunks // 2 else 0


def launch_constexprs(num_classes: int) -> dict:
    """The kernel's compile-time values for rows of ``num_classes`` logits."""
    c_pad, block_n = tile(num_classes)
    lanes_ = lanes(num_classes, c_pad)
    return dict(C_PAD=c_pad, BLOCK_N=block_n, LANES=lanes_, TAIL=tail(num_classes, c_pad, lanes_))


# This kernel's own log, as targets.py's: under Triton 3.6 a JIT function shared by
# two kernels took part in the second kernel's cache key differently once the first's key had been
# computed, so the gates' recorded keys depended on the order of the launches keyed (2026-12-04).
@triton.jit
def _log2(x):
    """log2 x of a sum of exponentials (>= 1; NaN in a row of -inf or NaN logits) as ``lg2.approx.ftz``
    (one MUFU op); tl.log2 under the interpreter (no libdevice)."""
    if FAST_MATH:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _chunks(z_ptr, stride_z, out_ptr, stride_out, N, C, FIRST: tl.constexpr, CHUNKS: tl.constexpr,
            BLOCK_N: tl.constexpr, LANES: tl.constexpr, PADDED: tl.constexpr):
    """(fp32 logits, output pointers, mask) of ``CHUNKS`` chunks of ``LANES`` columns from column
    ``FIRST`` of the program's rows, as a (CHUNKS * BLOCK_N, LANES) tile, chunk-major (slot = chunk *
    BLOCK_N + row): the warp's threads go along the lanes, then the rows, and a thread holds all of its
    lanes' chunks of a row, so a row's reductions are mostly a thread's own. (A 3-D tile's layout
    follows the loads' contiguity, whose tie between the rows and the chunks Triton 3.6 and 3.9 break
    the other way: 3.6 spread a row over C_PAD lanes.) ``PADDED``: some column may be past C, and loads
    -inf there. A row's pointer is computed once and its chunks are immediate offsets from it."""
    slot = tl.arange(0, CHUNKS * BLOCK_N)[:, None]
    lane = tl.arange(0, LANES)[None, :]
    chunk = FIRST + (slot // BLOCK_N) * LANES
    rows = tl.program_id(0) * BLOCK_N + slot % BLOCK_N
    rows64 = rows.to(tl.int64)  # the row index in int32 (ROW_CHUNK), its offset in int64
    ok = (rows < N) & (chunk + lane < C) if PADDED else rows < N
    z = tl.load((z_ptr + lane + rows64 * stride_z) + chunk, mask=ok, other=NEG_INF).to(tl.float32)
    return z, (out_ptr + lane + rows64 * stride_out) + chunk, ok


@triton.jit
def _per_row(x, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr):
    """A value per row (BLOCK_N) on every slot of a ``_chunks`` tile."""
    return tl.reshape(tl.broadcast_to(x[None, :, None], (CHUNKS, BLOCK_N, LANES)), (CHUNKS * BLOCK_N, LANES))


@triton.jit
def _max_over_chunks(z, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr):
    """Per row and lane of a ``_chunks`` tile: the maximum over its chunks (a thread's own values)."""
    return tl.max(tl.reshape(z, (CHUNKS, BLOCK_N, LANES)), axis=0)


@triton.jit
def _exp2_sum(d, scale, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr):
    """Per row and lane of a ``_chunks`` tile of d = z - m: the sum over its chunks of 2^(d scale)."""
    return tl.sum(tl.exp2(tl.reshape(d, (CHUNKS, BLOCK_N, LANES)) * scale), axis=0)


@triton.jit
def _store(d, out_p, ok, inv_tau, log_total, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr):
    """out = d / τ - ln Σ on a ``_chunks`` tile of d = z - m (one FFMA), ln Σ per row."""
    out = d * inv_tau - _per_row(log_total, CHUNKS, BLOCK_N, LANES)
    tl.store(out_p, out.to(out_p.dtype.element_ty), mask=ok)


@triton.jit
def kd_targets_kernel(z_ptr, stride_z, out_ptr, stride_out, N, C, inv_tau, C_PAD: tl.constexpr,
                      BLOCK_N: tl.constexpr, LANES: tl.constexpr, TAIL: tl.constexpr):
    """out[r] = z[r] / τ - logsumexp(z[r] / τ) for BLOCK_N rows: -inf where a logit is -inf, NaN in a
    row with a NaN (as the fp64 reference). A row is its first C_PAD / 2 columns and TAIL chunks of
    LANES after them (``tail``), or with TAIL = 0 all C_PAD columns as one piece. Everything follows
    from d = z - m, m the row's maximum of z (τ > 0): 0 at the maximum, whose exponent is then exactly
    0 and output exactly -ln Σ <= 0. (z/τ - m/τ in one FFMA errs by half an ulp of m/τ: logits of 1e30
    at τ = 1e-3 then gave an exponent past 2^31, and a positive log-target.)"""
    scale = inv_tau * 1.4426950408889634  # log2(e) / τ: exp2 is one MUFU op
    if TAIL == 0:
        ch: tl.constexpr = C_PAD // LANES
        z, out_p, ok = _chunks(z_ptr, stride_z, out_ptr, stride_out, N, C, 0, ch, BLOCK_N, LANES, True)
        d = z - _per_row(tl.max(_max_over_chunks(z, ch, BLOCK_N, LANES), axis=1), ch, BLOCK_N, LANES)
        log_total = _log2(tl.sum(_exp2_sum(d, scale, ch, BLOCK_N, LANES), axis=1)) * 0.6931471805599453
        _store(d, out_p, ok, inv_tau, log_total, ch, BLOCK_N, LANES)
    else:
        head: tl.constexpr = C_PAD // 2 // LANES
        za, out_a, ok_a = _chunks(z_ptr, stride_z, out_ptr, stride_out, N, C, 0, head, BLOCK_N, LANES, False)
        zb, out_b, ok_b = _chunks(z_ptr, stride_z, out_ptr, stride_out, N, C, C_PAD // 2, TAIL, BLOCK_N, LANES,
                                  True)
        # both pieces' per-lane partials in one layout, then one set of shuffles across the lanes
        m = tl.max(tl.maximum(_max_over_chunks(za, head, BLOCK_N, LANES),
                              _max_over_chunks(zb, TAIL, BLOCK_N, LANES)), axis=1)
        da, db = za - _per_row(m, head, BLOCK_N, LANES), zb - _per_row(m, TAIL, BLOCK_N, LANES)
        total = tl.sum(_exp2_sum(da, scale, head, BLOCK_N, LANES) + _exp2_sum(db, scale, TAIL, BLOCK_N, LANES), axis=1)
        log_total = _log2(total) * 0.6931471805599453
        _store(da, out_a, ok_a, inv_tau, log_total, head, BLOCK_N, LANES)
        _store(db, out_b, ok_b, inv_tau, log_total, TAIL, BLOCK_N, LANES)


def kd_targets_triton(teacher_logits: torch.Tensor, tau: float, out: torch.Tensor) -> torch.Tensor:
    """Fills ``out`` (N x C, rows contiguous) with ``log_softmax(teacher_logits / tau)`` in fp32 math;
    ``teacher_logits`` (N x C) rows contiguous."""
    n, num_classes = teacher_logits.shape
    if num_classes > limits.MAX_SUBCLASS_COLUMNS:
        raise ValueError(f"the triton KD targets kernel takes at most {limits.MAX_SUBCLASS_COLUMNS} classes "
                         f"(got C={num_classes})")
    constexprs = launch_constexprs(num_classes)
    # views the gates compile no kernel for are copied (``gated``); the pieces start on 16 rows' boundaries
    teacher_logits, written = gated.gated_input(teacher_logits, num_classes), gated.gated_output(out, num_classes)
    for start, stop in limits.row_pieces(n, ROW_CHUNK):  # a multiple of 16 rows but in a short tail
        kd_targets_kernel[(triton.cdiv(stop - start, constexprs["BLOCK_N"]),)](
            teacher_logits[start:], teacher_logits.stride(0), written[start:], written.stride(0), stop - start,
            num_classes, limits.inverse_temperature(tau), **constexprs, num_warps=NUM_WARPS)
    return gated.finish_output(written, out)


# What the gates compile (tests/test_triton_aot.py): every tile the launcher makes (C_PAD 2 .. 512),
# each launch it specialises apart (``_classes``), in logits of 16 and 32 bits and an output of 32
# bits (the offline targets' buffer) and of 16.
VARIANT_PADS = [1 << p for p in range(1, 10)]
assert VARIANT_PADS[-1] == limits.MAX_SUBCLASS_COLUMNS
ROWS = limits.ROW_COUNTS[0]  # the rows of the gates' first launch, as the targets' (what the JIT specialises on)


def _classes(c_pad: int) -> List[int]:
    """The C compiled at a tile size: one of each launch the JIT specialises apart (its constexprs, C = 1
    a constant, the multiples of 16 hinted), each the fewest classes of its kind (the most padding: the
    most instructions per class the cost gate counts)."""
    fewest = {}
    for c in range(1 if c_pad == 2 else c_pad // 2 + 1, c_pad + 1):
        fewest.setdefault((tuple(launch_constexprs(c).items()), c % 16 == 0, c == 1), c)
    return sorted(fewest.values())


def _variants() -> List[dict]:
    """Each launch at the gates' first rows (``ROWS``; the cost model's), then all of them at each other
    of ``limits.ROW_COUNTS``: the kinds of N the JIT compiles apart (``kd_targets_triton`` launches
    pieces of a multiple of 16 rows, at most ``ROW_CHUNK``, and a tail of fewer: ``limits.row_pieces``)."""
    variants = []
    for rows in limits.ROW_COUNTS:
        for c_pad, z_dtype, out_dtype in itertools.product(VARIANT_PADS, ("bf16", "fp32"), ("fp32", "bf16")):
            for c in _classes(c_pad):
                variants.append(dict(dtype=z_dtype, out_dtype=out_dtype, C=c, num_warps=NUM_WARPS,
                                     constexprs=launch_constexprs(c), rows=rows))
    return variants


VARIANTS = _variants()


def signature(variant: dict) -> dict:
    """The kernel's argument types for ahead-of-time compilation (``triton.compile``)."""
    return {"z_ptr": f"*{variant['dtype']}", "stride_z": "i32", "out_ptr": f"*{variant['out_dtype']}",
            "stride_out": "i32", "N": "i32", "C": "i32", "inv_tau": "fp32", "C_PAD": "constexpr",
            "BLOCK_N": "constexpr", "LANES": "constexpr", "TAIL": "constexpr"}


def pieces(constexprs: dict):
    """(first column, chunks of LANES) of each piece of a row, in the kernel's order: the first C_PAD / 2
    columns and the tail, or the whole row (``kd_targets_kernel``; the cost model's line walk)."""
    if constexprs["TAIL"]:
        return [(0, constexprs["C_PAD"] // 2 // constexprs["LANES"]), (constexprs["C_PAD"] // 2, constexprs["TAIL"])]
    return [(0, constexprs["C_PAD"] // constexprs["LANES"])]


def launch_values(variant: dict) -> dict:
    """The run-time integers of the gates' launch (contiguous rows of C logits and C targets)."""
    return dict(stride_z=variant["C"], stride_out=variant["C"], N=variant["rows"], C=variant["C"])
