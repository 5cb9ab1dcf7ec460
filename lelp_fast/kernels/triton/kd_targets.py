"""Triton kernel of the targets of one subclass per class with the teacher's logits given: vanilla KD.

With S = 1 the subclass log-softmax is over one value, so ``log t = log_softmax(z / τ)``
(docs/algorithm.md): the embeddings and the map are not read. The LELP kernel (``targets.py``) read
all of h and took the class log-partition once per program of 64 classes: on an H200 the 4 M x 768
bf16 launch with 300 given logits took 29.9 ms, 9.1x the floor of reading h, the logits and writing
the output. This kernel reads each row of logits once and writes its targets once.

A program takes ``BLOCK_N`` whole rows of ``C_PAD`` (the classes' next power of two) columns, about
``TILE_ELEMENTS`` values: a row's maximum, log-partition and output in registers, no loop. Every
entry of ``VARIANTS`` is compiled ahead of time for sm_80/sm_90 and gated like the other kernels
(``tests/test_triton_aot.py``: shared memory, spills, modelled time against the floor).
"""

from __future__ import annotations

import itertools
from typing import List

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from . import limits
from .fast_math import FAST_MATH

NEG_INF = tl.constexpr(float("-inf"))
# One warp a program, 32 values a thread: a row's reductions never leave the warp. With 4 warps
# Triton 3.6 spread rows of 64-512 classes over the warps (through shared memory: 40-63 SASS
# instructions an element at C = 63-300 where one warp takes 22-31; sm_90, 2026-12-04); 3.9 did not.
# The widest row, 512 classes, is 2 rows a program.
TILE_ELEMENTS = 1024
NUM_WARPS = 1
# Rows a launch takes, so that the kernel's row index stays in int32 (in int64 it took 4 more SASS
# instructions an element at C = 2, sm_90, 2026-12-04); more rows take several launches.
ROW_CHUNK = 1 << 30


def tile(num_classes: int):
    """(C_PAD, BLOCK_N) of a launch: a power of two of at least two columns, the rows of a tile."""
    c_pad = 1 << max(1, (num_classes - 1).bit_length())
    return c_pad, max(1, TILE_ELEMENTS // c_pad)


# This kernel's own exponential and log, as targets.py's: under Triton 3.6 a JIT function shared by
# two kernels took part in the second kernel's cache key differently once the first's key had been
# computed, so the gates' recorded keys depended on the order of the launches keyed (2026-12-04).
@triton.jit
def _exp(x):
    """e^x as ``ex2.approx.ftz`` on a GPU (one MUFU op); tl.exp under the interpreter (no libdevice)."""
    if FAST_MATH:
        return libdevice.fast_expf(x)
    else:
        return tl.exp(x)


@triton.jit
def _log(x):
    """ln x of a sum of exponentials (>= 1, or 0 where every logit is -inf) as ``lg2.approx.ftz``."""
    if FAST_MATH:
        return libdevice.fast_logf(x)
    else:
        return tl.log(x)


@triton.jit
def kd_targets_kernel(z_ptr, stride_z, out_ptr, stride_out, N, C, inv_tau, C_PAD: tl.constexpr,
                      BLOCK_N: tl.constexpr, LANES: tl.constexpr):
    """out[r] = z[r] / τ - logsumexp(z[r] / τ) for BLOCK_N rows: -inf where a logit is -inf, NaN in a
    row with a NaN (as the fp64 reference). The tile is viewed as (C_PAD / LANES, BLOCK_N, LANES),
    column ``i * LANES + lane`` (``lanes``): a row is spread over at most LANES threads, each holding
    C_PAD / LANES of its values, so its maximum and sum are mostly a thread's own adds, then a few
    shuffles (a 2-D tile spread a row over up to 128 threads and exchanged through shared memory)."""
    i = tl.arange(0, C_PAD // LANES)[:, None, None]
    r = tl.arange(0, BLOCK_N)[None, :, None]
    cols = i * LANES + tl.arange(0, LANES)[None, None, :]
    # the row index in int32 (a launch takes fewer than 2**31 rows: ROW_CHUNK), its offset in int64
    rows64 = (tl.program_id(0) * BLOCK_N + r).to(tl.int64)
    ok = (rows64 < N) & (cols < C)
    z = tl.load(z_ptr + rows64 * stride_z + cols, mask=ok, other=0.0).to(tl.float32) * inv_tau
    z = tl.where(cols < C, z, NEG_INF)
    # each thread's own values first (axis 0), then across the lanes (axis 1 of what is left); a row
    # of -inf logits gives NaN (z - m = -inf - -inf), as torch's log_softmax
    m = tl.max(tl.max(z, axis=0), axis=1)[None, :, None]
    lse = m + _log(tl.sum(tl.sum(_exp(z - m), axis=0), axis=1))[None, :, None]
    out = (z - lse).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64 * stride_out + cols, out, mask=ok)


def lanes(num_classes: int, c_pad: int) -> int:
    """LANES of a launch: a quarter of the row, at least 2 and at most a warp, so each thread holds 4
    values of a row (more past 128 columns) and a warp's load instruction spans the rows of at most
    128 logits (2 or 4 cache lines of 16- or 32-bit logits; the L1 serves about one line a clock).
    Whole rows of 64 or more classes take LANES = C_PAD: their loads are 16-byte vectors. Compiled for
    sm_90 (2026-12-04, one warp): under Triton 3.9 rows of 3-31 classes across C_PAD lanes took 38-47
    SASS instructions an element, most of them the reductions' shuffles, and 20-31 with a quarter;
    3.6 lays the loads out by their contiguity either way (38-47). At 512 whole classes the quarter
    took 22 (3.6) and 18 (3.9), C_PAD 16.5 and 16.3."""
    if num_classes == c_pad and c_pad >= 64:
        return c_pad
    return min(32, max(2, c_pad // 4))


def kd_targets_triton(teacher_logits: torch.Tensor, tau: float, out: torch.Tensor) -> torch.Tensor:
    """Fills ``out`` (N x C, rows contiguous) with ``log_softmax(teacher_logits / tau)`` in fp32 math;
    ``teacher_logits`` (N x C) rows contiguous."""
    n, num_classes = teacher_logits.shape
    if num_classes > limits.MAX_SUBCLASS_COLUMNS:
        raise ValueError(f"the triton KD targets kernel takes at most {limits.MAX_SUBCLASS_COLUMNS} classes "
                         f"(got C={num_classes})")
    c_pad, block_n = tile(num_classes)
    for start in range(0, n, ROW_CHUNK):
        rows = min(ROW_CHUNK, n - start)
        kd_targets_kernel[(triton.cdiv(rows, block_n),)](
            teacher_logits[start:], teacher_logits.stride(0), out[start:], out.stride(0), rows, num_classes,
            1.0 / tau, C_PAD=c_pad, BLOCK_N=block_n, LANES=lanes(num_classes, c_pad), num_warps=NUM_WARPS)
    return out


# What the gates compile (tests/test_triton_aot.py): every tile the launcher makes (C_PAD 2 .. 512),
# each launch it specialises apart (``_classes``), in logits of 16 and 32 bits and an output of 32
# bits (the offline targets' buffer) and of 16.
VARIANT_PADS = [1 << p for p in range(1, 10)]
assert VARIANT_PADS[-1] == limits.MAX_SUBCLASS_COLUMNS
ROWS = 4 << 20  # the rows of the gates' launch, as the targets' (what the JIT specialises on)


def _classes(c_pad: int) -> List[int]:
    """The C compiled at a tile: one of each launch the JIT specialises apart (C = 1 a constant, the
    multiples of 16 hinted), each the fewest classes of its kind the tile takes (the most padding: the
    most instructions per class the cost gate counts). At C_PAD = 4 and 8 every C is one launch."""
    if c_pad == 2:
        return [2, 1]
    fewest = [c_pad // 2 + 1]  # no multiple of 16, nor 1
    hinted = [c_pad] if c_pad >= 16 else []  # whole rows
    if c_pad >= 64:
        hinted.append((c_pad // 32 + 1) * 16)  # the fewest multiple of 16 classes, with a quarter row's lanes
    return hinted + fewest


def _variants() -> List[dict]:
    variants = []
    for c_pad, z_dtype, out_dtype in itertools.product(VARIANT_PADS, ("bf16", "fp32"), ("fp32", "bf16")):
        for c in _classes(c_pad):
            assert tile(c) == tile(c_pad)
            variants.append(dict(dtype=z_dtype, out_dtype=out_dtype, C=c, num_warps=NUM_WARPS,
                                 constexprs=dict(C_PAD=c_pad, BLOCK_N=tile(c)[1], LANES=lanes(c, c_pad))))
    return variants


VARIANTS = _variants()


def signature(variant: dict) -> dict:
    """The kernel's argument types for ahead-of-time compilation (``triton.compile``)."""
    return {"z_ptr": f"*{variant['dtype']}", "stride_z": "i32", "out_ptr": f"*{variant['out_dtype']}",
            "stride_out": "i32", "N": "i32", "C": "i32", "inv_tau": "fp32", "C_PAD": "constexpr",
            "BLOCK_N": "constexpr", "LANES": "constexpr"}


def launch_values(variant: dict) -> dict:
    """The run-time integers of the gates' launch (contiguous rows of C logits and C targets)."""
    return dict(stride_z=variant["C"], stride_out=variant["C"], N=ROWS, C=variant["C"])
