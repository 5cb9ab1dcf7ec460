"""Triton kernel of the targets op: projection + both segmented log-softmaxes, one pass.

The kernel is persistent: about two programs per SM (per class group), each looping over row
tiles of ``BLOCK_N`` rows and streaming the map from L2 once per tile, and h in ``BLOCK_D`` slices,
through 16-bit tensor-core dots. (A resident form that kept a small 16-bit map in shared memory was
removed on 2026-12-04: on the H200 it took 3.01 ms at its own shape, K = 16 with the head at d = 768,
where this form takes 1.81 ms.) The fp32 map is split on the host
(``split_map``, cached) into a ``hi`` and a ``lo`` part of the input dtype (bf16 for fp32 inputs),
per-column power-of-two scaled so fp16 neither overflows nor underflows: ``h @ A = (h @ hi + h @ lo)
· col_scale`` keeps fp32-like accuracy (16 bits of each column) at bf16/fp16 speed (two chained dots
into one fp32 accumulator). fp32 h is split in the kernel into bf16 hi + lo: three dots,
h_lo @ lo left out (errors up to ~2^-16 of a row's largest |log t|; the ``tf32x3`` dots before,
with the map re-split in every tile, were modelled at 4.8x the H200's floor at K = 128).
The subclass columns are laid out as a padded ``C_PAD x S_PAD`` grid, so the epilogue reshapes
the accumulator to (rows, class, subclass) and takes every class's log-softmax with one
reduction; the teacher head (when no logits are given) is a second, 16-column dot. A program holds
at most 64 columns, ``C_BLOCK`` whole classes (128 for a class of more than 64 subclasses and for
``whole_grid``'s grids); wider maps take several programs per row tile, those that hold a class.

Numerics are tested on CPU under ``TRITON_INTERPRET=1`` against the fp64 reference; every entry
of ``VARIANTS`` is compiled ahead of time for sm_80/sm_90, its PTX checked and its shared memory,
registers and spills read from the CUBIN, and its modelled cost at the issue's shapes held against
the floor (``tests/test_triton_aot.py``, ``cost.py``).
"""

from __future__ import annotations

import functools
import itertools
from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from ..._derived import derived
from . import gated, interpreting, limits
from .fast_math import FAST_MATH
from .limits import padded_grid

NEG_INF = tl.constexpr(float("-inf"))
HEAD_PAD = limits.MAX_HEAD_CLASSES  # the smallest tensor-core N tile: the head dot has 16 columns
# Extra bits carried by the lo part: hi's rounding error is < 2^-(mantissa + 1) of a scaled
# entry (|x| <= 1), so hi · 2^shift stays exact and lo = error · 2^shift stays a normal number.
LO_SHIFT = {torch.bfloat16: 8, torch.float16: 11}
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TORCH_DTYPES = {name: dtype for dtype, name in _TL_DTYPES.items()}  # "bf16" -> torch.bfloat16


def map_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the map's hi and lo parts for embeddings of ``dtype``: their own for 16-bit
    inputs; bf16 for fp32 ones, whose h the kernels split into bf16 parts too (``_split_h``)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


class Config(NamedTuple):
    """One launch configuration; every one the launcher can produce is listed in CONFIGS or FP32_CONFIGS."""

    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


# A program computes at most this many subclass columns (whole classes of the padded grid); wider
# maps take several programs per row tile, each re-reading h (from L2: the class groups of a row
# tile are neighbouring program ids). Wider accumulators spilled: 64 x 256 fp32 columns spilled
# 100-400 B/thread and 64 x 512 1.5-12 KB under every config tried (sm_80/sm_90, Triton 3.9), and
# needed up to 565 KB of shared memory at 3 stages (OutOfResources on any GPU).
COLUMNS_PER_PROGRAM = limits.MAX_SUBCLASSES_PER_PROGRAM
# ... but only a whole 16-bit grid (whole_grid: with the head, "mid-exact-head"; of 128 columns with
# given logits, "mid-exact-logits") or a class of more than 64 (padded) subclasses takes 128: others
# hold at most 64 columns ("narrow"), two or more a row tile, each reading h (the second from L2). On
# the H200 (2026-12-04 sweep, 8 x 16 bf16 with the head) two programs of 64 at 128 x 64 x 8 warps x
# 3 stages took 6.09 ms, one of 128 at 128 x 32 x 8 x 4 5.15 ms, at 128 x 16 x 8 x 2 (then "mid")
# 14.9 ms, which spilled on padded grids (8-400 B a thread, 2026-12-04 gates) where "narrow" does not.
NARROW_COLUMNS = 64
# The configs, measured on an H200 (2026-12-04, benchmarks/sweep_targets_gpu.py: 287 configs at
# 4 M x 768 in bf16 with the head; docs/benchmarks.md): at 16 columns 128 x 64, 4 warps, 3 stages
# took 1.81 ms (1.14x the copy floor; the 256 x 32 x 8 warps before: 2.71 ms, and the resident form
# the launcher took there, 3.01 ms; 4 stages, 1.73 ms, was not tried against the gates: chosen while
# fp32 still shared these configs, whose h at 4 stages came within 3 KB of sm_80's shared memory);
# at 64 columns 128 x 64, 8 warps, 3 stages 3.26 ms (128 x 32: 4.63 ms); at 128 columns 128 x 32,
# 8 warps, 4 stages 5.15 ms. That spills with given logits (8-48 B on sm_80, both Tritons; one-off
# compiles of 2026-12-05) and on padded grids; at 3 stages at no whole 128-column grid with given
# logits (40 B at 8 x 32, 256 columns, under 3.6 on sm_80), not measured on a GPU: "mid-exact-logits". Other
# programs of 128 columns (a class of 65-128 subclasses) take 64 x 16 x 8 x 3: spill-free at all 184
# launches, both Tritons, not measured on a GPU (64-row tiles were a little faster at 64 and 128
# columns in the sweep: 3.05, 4.96 ms). Faster configs spill, or were not tried against the gates
# (256 x 32 x 8 x 4: 4.41 ms at 128 columns). Every entry is compiled for sm_80/sm_90 under Triton
# 3.6 and 3.9, its shared memory, registers and spills checked.
CONFIGS = {
    "thin": [Config(128, 64, 4, 3)],
    "narrow": [Config(128, 64, 8, 3)],
    "mid": [Config(64, 16, 8, 3)],
    "mid-exact-head": [Config(128, 32, 8, 4)],
    "mid-exact-logits": [Config(128, 32, 8, 3)],
}
# fp32 inputs keep the configs of 2026-12-02 (not measured on a GPU): with h split into bf16 parts
# in the kernel (more registers), every new config above spilled somewhere on fp32 (16-120 B per
# thread at 16 columns under Triton 3.9, on sm_80 and sm_90; up to 416 B at 128 columns). No whole
# grid here (whole_grid; with the head until session 54), nor with unaligned d: their spill-free
# 128-column config, 128 x 16 x 8 x 2, took 14.9 ms in bf16 on the H200 where two programs of 64 took
# 6.09, and 18.0 ms at 15 x 7 fp32 (padded, masked, spilling) where two of 64 took 10.0 (12-04).
FP32_CONFIGS = {
    "thin": [Config(256, 32, 8, 3)],
    "narrow": [Config(128, 32, 8, 3)],
    "mid": [Config(64, 16, 8, 3)],
}


def class_block(c_pad: int, s_pad: int, whole: bool = False) -> int:
    """Classes per program: as many whole classes as fit ``program_columns``; ``whole``: a whole C x S
    grid (no padding) the launcher takes in programs of 128 columns (``whole_grid``)."""
    return max(1, min(c_pad, program_columns(s_pad, whole) // s_pad))


def program_columns(s_pad: int, whole: bool = False) -> int:
    """The most columns a program holds: COLUMNS_PER_PROGRAM for a ``whole`` grid (``whole_grid``) or a
    class of more than NARROW_COLUMNS (padded) subclasses, else NARROW_COLUMNS."""
    return COLUMNS_PER_PROGRAM if whole or s_pad > NARROW_COLUMNS else NARROW_COLUMNS


def config_class(columns: int, whole: bool = False, with_head: bool = True) -> str:
    """Which config list serves a program of ``columns`` accumulator columns (see CONFIGS); ``whole``:
    a whole grid (``whole_grid``), with the teacher's head or given logits (``with_head`` False)."""
    if columns <= 16:
        return "thin"
    if columns <= 64:
        return "narrow"
    return "mid" if not whole else "mid-exact-head" if with_head else "mid-exact-logits"


# Embeddings whose width d is not a multiple of 16 (GloVe's 50 and 300): no divisibility hints, so h
# comes in without 16-byte copies. Under the configs above that spilled 16-888 B per thread (both
# Tritons, sm_80 and sm_90, 2026-12-04); these spill nowhere (docs/benchmarks.md). Not measured on a
# GPU. No whole grid (as fp32 above).
UNALIGNED_CONFIGS = {
    "thin": [Config(64, 32, 4, 3)],
    "narrow": [Config(128, 32, 8, 3)],
    "mid": [Config(64, 16, 8, 3)],
}
_TABLES = {"16-bit": CONFIGS, "fp32": FP32_CONFIGS, "unaligned": UNALIGNED_CONFIGS}


def aligned(d: int) -> bool:
    """Whether embeddings of width ``d`` (rows contiguous) get the JIT's divisibility hints."""
    return d % 16 == 0


def config_table_name(dtype: torch.dtype, d_aligned: bool = True) -> str:
    """Which table serves embeddings of ``dtype``: "unaligned" for a d that is not a multiple of 16,
    else "fp32" or "16-bit"."""
    if not d_aligned:
        return "unaligned"
    return "fp32" if dtype == torch.float32 else "16-bit"


def config_table(dtype: torch.dtype, d_aligned: bool = True) -> dict:
    """The config lists for embeddings of ``dtype`` (``config_table_name``)."""
    return _TABLES[config_table_name(dtype, d_aligned)]


@triton.jit
def _accumulate(h, hi_ptr, lo_ptr, d_idx, cols, ld, d_ok, acc, MASK_COLS: tl.constexpr):
    """acc += h @ (hi + lo) over one BLOCK_D slice of a (D, ld) 16-bit map. fp32 h is split here into
    bf16 hi + lo parts (``_split_h``): three bf16 dots, h_lo @ lo (under 2^-17 of a term) left out.
    ``MASK_COLS``: the map stores ``ld`` columns, fewer than the dot's (``split_map`` keeps no padding
    class); the others load as 0 and are not read (the map is the largest stream from L2)."""
    offs = d_idx[:, None] * ld + cols[None, :]
    ok = d_ok[:, None]
    if MASK_COLS:
        ok = ok & (cols < ld)[None, :]
    hi = tl.load(hi_ptr + offs, mask=ok, other=0.0)
    lo = tl.load(lo_ptr + offs, mask=ok, other=0.0)
    if h.dtype == tl.float32:
        h_hi, h_lo = _split_h(h)
        acc = tl.dot(h_hi, hi, acc)
        acc = tl.dot(h_hi, lo, acc)
        acc = tl.dot(h_lo, hi, acc)
    else:
        acc = tl.dot(h, hi, acc)
        acc = tl.dot(h, lo, acc)
    return acc


@triton.jit
def _sub_width(C, KP: tl.constexpr, S_PAD: tl.constexpr, EXACT: tl.constexpr):
    """The subclass map's stored columns (``sub_width``); the whole grid where it has no padding."""
    if EXACT:
        return KP
    else:
        # rounded up to 8, or to 16 beyond 64 (several class groups may read a row); without a branch,
        # which took the multiple of 8 from the loads' alignment (half their 16-byte copies, 2026-12-05)
        columns = C * S_PAD
        by_8 = tl.cdiv(columns, 8) * 8
        return by_8 + (tl.cdiv(columns, 16) * 16 - by_8) * (columns > 64).to(tl.int32)


@triton.jit
def _split_h(h):
    """fp32 h as bf16 hi + lo (h - hi is exact in fp32; lo keeps 8 more bits): h = hi + lo to ~2^-17
    of |h|. bf16 has fp32's exponent range, so no scaling is needed (unlike the map's fp16 parts)."""
    h_hi = h.to(tl.bfloat16)
    return h_hi, (h - h_hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _exp(x):
    """e^x as ``ex2.approx.ftz`` of x·log2(e): one MUFU op and a multiply. tl.exp's non-FTZ ``ex2``
    adds a range check and two multiplies; the results it flushes (below 2^-126) are softmax terms
    next to the maximum's 1."""
    if FAST_MATH:
        return libdevice.fast_expf(x)
    else:
        return tl.exp(x)


@triton.jit
def _log(x):
    """ln x as ``lg2.approx.ftz`` (about 2^-22 absolute error) times ln 2, for sums of exponentials
    (>= 1, or 0 where every term is -inf); tl.log is libdevice's accurate logf, about 20 instructions."""
    if FAST_MATH:
        return libdevice.fast_logf(x)
    else:
        return tl.log(x)


@triton.jit
def _shifted(x, scale, axis: tl.constexpr):
    """(x - max x) * scale over ``axis``, the max unscaled (0 where every entry is -inf, so such a
    slice stays -inf, never NaN): its exponentials sum to at least 1 and nothing overflows."""
    m = tl.max(x, axis=axis)
    return (x - tl.expand_dims(tl.where(m == NEG_INF, 0.0, m), axis)) * scale


@triton.jit
def _logits_lse(z_ptr, stride_z, rows64, row_ok, C, inv_tau, BLOCK_N: tl.constexpr, C_PAD: tl.constexpr):
    """The class log-partition of all C given logits as (m, log Σ_c exp((z_c - m) / tau)), m the
    unscaled max (0 where every logit is -inf), 32 classes at a time (online rescaling); kept apart
    because m / tau + log Σ rounded the log-sum away at z / tau of 5e4-1e6. Taken before a tile's
    dots (``_tile_logits_lse``), while no accumulator is live: in the epilogue, beside the 128-column
    accumulator, chunks of 8-32 classes still spilled 240-248 B (fp32 h, bf16 logits, 16 x 8, sm_80,
    Triton 3.6), and chunks of 128 classes 1.2-2.5 KB a thread at 512 classes of one subclass."""
    CHUNK: tl.constexpr = min(C_PAD, 32)
    m = tl.full((BLOCK_N,), NEG_INF, dtype=tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        ok = row_ok[:, None] & (c < C)[None, :]
        z = tl.load(z_ptr + rows64[:, None] * stride_z + c[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.where((c < C)[None, :], z, NEG_INF)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        total = total * _exp((m - m_safe) * inv_tau) + tl.sum(_exp((z - m_safe[:, None]) * inv_tau), axis=1)
        m = m_new
    return tl.where(m == NEG_INF, 0.0, m), _log(total)


@triton.jit
def _tile_logits_lse(z_ptr, stride_z, rows64, row_ok, C, inv_tau, HAS_LOGITS: tl.constexpr, BLOCK_N: tl.constexpr,
                     C_PAD: tl.constexpr):
    """A row tile's class log-partition (m, log-sum) from the given logits (``_logits_lse``), taken
    before the tile's dots, while no accumulator is live; zeros with the head, whose log-partition
    the epilogue takes from its accumulator."""
    if HAS_LOGITS:
        return _logits_lse(z_ptr, stride_z, rows64, row_ok, C, inv_tau, BLOCK_N, C_PAD)
    else:
        return tl.zeros((BLOCK_N,), dtype=tl.float32), tl.zeros((BLOCK_N,), dtype=tl.float32)


@triton.jit
def _epilogue(u, z, z_max, z_log_sum, rows, group, sub_scale_ptr, sub_bias_ptr, head_scale_ptr, head_bias_ptr, z_ptr,
              stride_z, out_ptr, stride_out, N, C, S, inv_beta, inv_tau, HAS_LOGITS: tl.constexpr,
              S_PAD: tl.constexpr, C_BLOCK: tl.constexpr, EXACT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Both segmented log-softmaxes of one row tile's accumulators (u: this group's subclass columns,
    z: the head's 16 columns), stored into ``out``; ``z_max``, ``z_log_sum``: the given logits'
    log-partition (``_tile_logits_lse``), unused with the head. Each log-softmax shifts its values
    by their unscaled max, scales, and subtracts the log-sum from the shifted value (as the C++
    kernels' row_math.h): x / tau - (max / tau + log Σ) rounded the log-sum away at x / tau of
    5e4-1e6 (tau = 1e-6: class probabilities summing to 1.0057), and a finite x whose x / tau
    overflows float32 gave NaN."""
    KW: tl.constexpr = C_BLOCK * S_PAD
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # row offsets can pass 2**31 elements
    k_cols = group * KW + tl.arange(0, KW)
    h_cols = tl.arange(0, 16)
    # Class log-probabilities log p_c = log_softmax(z / tau)_c of this group's classes, (BLOCK_N, C_BLOCK).
    c_idx = group * C_BLOCK + tl.arange(0, C_BLOCK)
    c_ok = (c_idx < C)[None, :]
    if HAS_LOGITS:
        zc = tl.load(z_ptr + rows64[:, None] * stride_z + c_idx[None, :], mask=row_ok[:, None] & c_ok,
                     other=0.0).to(tl.float32)
        log_p = (zc - z_max[:, None]) * inv_tau - z_log_sum[:, None]
    else:
        z = z * tl.load(head_scale_ptr + h_cols)[None, :] + tl.load(head_bias_ptr + h_cols)[None, :]
        z = _shifted(tl.where((h_cols < C)[None, :], z, NEG_INF), inv_tau, 1)
        log_sum = _log(tl.sum(_exp(z), axis=1))
        # this group's C_BLOCK head columns: the group-th run of the 16 (C_PAD <= 16 with a head), picked
        # on a (rows, 16 / C_BLOCK, C_BLOCK) view; a (rows, C_BLOCK, 16) one-hot pick held 16x the values
        z3 = tl.reshape(z, (BLOCK_N, 16 // C_BLOCK, C_BLOCK))
        runs = tl.arange(0, 16 // C_BLOCK)
        log_p = tl.sum(tl.where((runs == group)[None, :, None], z3, 0.0), axis=1) - log_sum[:, None]

    # Subclass log-softmax per class on the (rows, class, subclass) view; log p_c added after it, so
    # a huge u / beta cannot cancel log p_c away.
    u = u * tl.load(sub_scale_ptr + k_cols)[None, :] + tl.load(sub_bias_ptr + k_cols)[None, :]
    if S_PAD == 1:  # S = 1: the log-softmax of one value u is u - u (0, NaN where u is not finite)
        out = ((u - u) + log_p).to(out_ptr.dtype.element_ty)
    else:
        # no mask: a padded subclass slot's bias is -inf (split_map), so is its u (a mask here spilled
        # 16-400 B a thread on padded grids of 128 columns, sm_80/sm_90, Triton 3.6 and 3.9)
        u3 = _shifted(tl.reshape(u, (BLOCK_N, C_BLOCK, S_PAD)), inv_beta, 2)
        out3 = (u3 - _log(tl.sum(_exp(u3), axis=2))[:, :, None]) + log_p[:, :, None]
        out = tl.reshape(out3, (BLOCK_N, KW)).to(out_ptr.dtype.element_ty)
    if EXACT:  # C = C_PAD and S = S_PAD: whole contiguous column ranges, so the stores vectorise
        out_offs = rows64[:, None] * stride_out + k_cols[None, :]
        tl.store(out_ptr + out_offs, out, mask=row_ok[:, None])
    else:  # padded grid column k = c * S_PAD + s is output column c * S + s, stored on the 2-D tile as above
        local = tl.arange(0, KW)
        s_col = local % S_PAD
        c_col = group * C_BLOCK + local // S_PAD
        # S <= S_PAD = 1 is 1: columns k, affine in the program's column index (a run-time S * c per
        # column, a loop invariant of each thread's columns, spilled at 512 x 1 under Triton 3.6)
        cols = c_col * S + s_col if S_PAD > 1 else c_col
        mask = row_ok[:, None] & ((c_col < C) & (s_col < S))[None, :]
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], out, mask=mask)


@triton.jit
def lelp_targets_kernel(
    h_ptr, stride_h, sub_hi_ptr, sub_lo_ptr, sub_scale_ptr, sub_bias_ptr,
    head_hi_ptr, head_lo_ptr, head_scale_ptr, head_bias_ptr, z_ptr, stride_z, out_ptr, stride_out,
    N, D, C, S, inv_beta, inv_tau,
    HAS_LOGITS: tl.constexpr,
    C_PAD: tl.constexpr, S_PAD: tl.constexpr, C_BLOCK: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """A persistent program loops over row tiles of its class group and streams the map's BLOCK_D
    slices from L2 once per tile, so each map read serves BLOCK_N rows."""
    KP: tl.constexpr = C_PAD * S_PAD  # the padded grid's columns
    KW: tl.constexpr = C_BLOCK * S_PAD  # this program's columns: classes [group * C_BLOCK, +C_BLOCK)
    # the head's stored columns (head_width): 16 on the grids the launcher takes in programs of 128 columns
    HEAD_LD: tl.constexpr = 16 if C_PAD * S_PAD > 64 and (EXACT or S_PAD > 64) else max(8, C_PAD)
    groups = tl.cdiv(C, C_BLOCK)  # the class groups that hold a class: a group of padding is not launched
    pid = tl.program_id(0)
    group = pid % groups  # a row tile's class groups are neighbours: their h re-reads hit L2
    k_cols = group * KW + tl.arange(0, KW)
    h_cols = tl.arange(0, 16)
    for tile in range(pid // groups, tl.cdiv(N, BLOCK_N), tl.num_programs(0) // groups):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        z_max, z_log_sum = _tile_logits_lse(z_ptr, stride_z, rows64, row_ok, C, inv_tau, HAS_LOGITS, BLOCK_N, C_PAD)
        u = tl.zeros((BLOCK_N, KW), dtype=tl.float32)
        z = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_idx = d0 + tl.arange(0, BLOCK_D)
            d_ok = d_idx < D
            h = tl.load(h_ptr + rows64[:, None] * stride_h + d_idx[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            u = _accumulate(h, sub_hi_ptr, sub_lo_ptr, d_idx, k_cols, _sub_width(C, KP, S_PAD, EXACT), d_ok, u,
                            not EXACT)
            if not HAS_LOGITS:
                z = _accumulate(h, head_hi_ptr, head_lo_ptr, d_idx, h_cols, HEAD_LD, d_ok, z, HEAD_LD < 16)
        _epilogue(u, z, z_max, z_log_sum, rows, group, sub_scale_ptr, sub_bias_ptr, head_scale_ptr, head_bias_ptr,
                  z_ptr, stride_z, out_ptr, stride_out, N, C, S, inv_beta, inv_tau, HAS_LOGITS, S_PAD, C_BLOCK, EXACT,
                  BLOCK_N)


_autotuned = {  # keyed as Plan.tuner: (config_class, config_table_name)
    (name, table_name): triton.autotune(
        [triton.Config({"BLOCK_N": c.block_n, "BLOCK_D": c.block_d}, num_warps=c.num_warps, num_stages=c.num_stages)
         for c in configs], key=["D", "C_PAD", "S_PAD", "HAS_LOGITS", "EXACT"])(lelp_targets_kernel)
    for table_name, table in _TABLES.items() for name, configs in table.items()
}


class SplitMap(NamedTuple):
    """The fused map laid out for the kernel (see ``split_map``)."""

    sub_hi: torch.Tensor  # (d, sub_width) in map_dtype(input dtype): the grid's columns of real classes
    sub_lo: torch.Tensor
    sub_scale: torch.Tensor  # (C_PAD * S_PAD,) fp32: undoes the column scaling and 2^shift
    sub_bias: torch.Tensor  # (C_PAD * S_PAD,) fp32
    head_hi: Optional[torch.Tensor]  # (d, head_width) or None when logits are given
    head_lo: Optional[torch.Tensor]
    head_scale: Optional[torch.Tensor]
    head_bias: Optional[torch.Tensor]
    c_pad: int
    s_pad: int


def _split_columns(m: torch.Tensor, dtype: torch.dtype, stored: int):
    """hi, lo (dtype) of m's first ``stored`` columns, the ones the kernel reads, and an fp32 scale of
    all of m's columns (1 beyond ``stored``) with m ≈ (hi + lo) * scale, to ~2^-16 of each column's max."""
    padding = m.shape[1] - stored
    m = m[:, :stored].to(torch.float64)
    col_max = m.abs().amax(0)
    exponent = torch.where(col_max > 0, torch.ceil(torch.log2(col_max.clamp_min(1e-300))), torch.zeros_like(col_max))
    shift = LO_SHIFT[dtype]
    unit = torch.exp2(exponent)  # |m / unit| <= 1
    scaled = m / unit
    hi = scaled.to(dtype)
    lo = ((scaled - hi.to(torch.float64)) * 2.0**shift).to(dtype)
    hi = (hi.to(torch.float64) * 2.0**shift).to(dtype)  # exact: a power-of-two scaling
    scale = (unit * 2.0**-shift).to(torch.float32)
    return hi.contiguous(), lo.contiguous(), torch.cat([scale, scale.new_ones(padding)])


def sub_width(num_classes: int, s_pad: int) -> int:
    """Columns of the stored subclass map (the kernel's ``_sub_width``): the padded grid's columns of the
    real classes, rounded up to 8 (16-byte rows, so the loads stay 16-byte copies); no padding class is
    stored, so none is streamed. Beyond NARROW_COLUMNS, where several class groups may each read a run
    of a row, rounded up to 16: rows of 32-byte multiples keep each group's run of 128 bytes on whole
    32-byte sectors (rows of 240 bytes had every other row's boundary sector read by both groups)."""
    columns = num_classes * s_pad
    return -(-columns // 16) * 16 if columns > NARROW_COLUMNS else -(-columns // 8) * 8


def head_width(c_pad: int, s_pad: int, exact: bool) -> int:
    """Columns of the stored head (the kernel's ``HEAD_LD``), a function of the grid alone, as the
    split map is: 8 for at most 8 (padded) classes, else 16, and 16 on the grids a 16-bit launch takes
    in programs of more than NARROW_COLUMNS columns (``class_block``, whole grids with the head), fp32
    and unaligned d included, which take programs of 64 since session 54 (each group then reads 8
    columns of zeros: left so, as the kernel's ``HEAD_LD`` and the recorded launches are). The head's
    dot takes 16 columns (the smallest tensor-core tile); the rest load as 0. Programs of 128 columns
    keep 16: the mask cost the 1 x 128 grid's launch 8 B of stack on sm_80 under Triton 3.9."""
    return 16 if class_block(c_pad, s_pad, exact) * s_pad > NARROW_COLUMNS else max(8, c_pad)


def split_map(weight: torch.Tensor, bias: torch.Tensor, num_classes: int, n_subclasses: int, dtype: torch.dtype,
              with_head: bool) -> SplitMap:
    """Lays the fused ``[A | Wᵀ]``, ``[e | b]`` out for the kernel: padded grid, hi/lo parts of ``dtype``
    stored for the real classes only (``sub_width``, ``head_width``: the kernel masks the rest); a
    padded subclass slot (s >= S) has a bias of -inf, which the kernel's unmasked log-partition needs."""
    d, device = weight.shape[0], weight.device
    c_pad, s_pad = padded_grid(num_classes, n_subclasses)
    k = num_classes * n_subclasses
    grid_cols = (torch.arange(num_classes, device=device)[:, None] * s_pad
                 + torch.arange(n_subclasses, device=device)[None, :]).flatten()
    sub = torch.zeros(d, c_pad * s_pad, dtype=torch.float64, device=device)
    sub[:, grid_cols] = weight[:, :k].to(torch.float64)
    sub_bias = torch.zeros(c_pad, s_pad, dtype=torch.float32, device=device)
    # a padded subclass slot's u is -inf: out of its class's log-partition without a mask in the kernel
    sub_bias[:, n_subclasses:] = float("-inf")
    sub_bias = sub_bias.flatten()
    sub_bias[grid_cols] = bias[:k].to(torch.float32)
    sub_hi, sub_lo, sub_scale = _split_columns(sub, dtype, sub_width(num_classes, s_pad))
    head = (None,) * 4
    if with_head:
        exact = (c_pad, s_pad) == (num_classes, n_subclasses)
        w = torch.zeros(d, HEAD_PAD, dtype=torch.float64, device=device)
        w[:, :num_classes] = weight[:, k:].to(torch.float64)
        b = torch.zeros(HEAD_PAD, dtype=torch.float32, device=device)
        b[:num_classes] = bias[k:].to(torch.float32)
        head = (*_split_columns(w, dtype, head_width(c_pad, s_pad, exact)), b)
    return SplitMap(sub_hi, sub_lo, sub_scale, sub_bias, *head, c_pad, s_pad)


def cached_split_map(weight: torch.Tensor, bias: torch.Tensor, num_classes: int, n_subclasses: int,
                     dtype: torch.dtype, with_head: bool, device: torch.device) -> SplitMap:
    """``split_map`` of the fp32 ``weight``/``bias`` on ``device``, made once per (weight, bias, their
    versions, shape, dtype, device): splitting costs about 55 small fp64 kernels (~0.1 ms on a GPU),
    per call and teacher before the cache (issue 21 item 7). See :func:`lelp_fast._derived.derived`."""
    def make():
        return split_map(weight.to(device, torch.float32), bias.to(device, torch.float32), num_classes,
                         n_subclasses, dtype, with_head)

    return derived(weight, ("triton", num_classes, n_subclasses, dtype, with_head, str(device)), make, bias)


def _interpreting() -> bool:
    return interpreting()


# Persistent grids: this many programs per SM and class group (each loops over row tiles); under the
# interpreter a fixed, small number, so the tests run the loop over several tiles per program.
PROGRAMS_PER_SM = 2
INTERPRETER_PROGRAMS = 2


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def row_programs(n_tiles: int, device: torch.device) -> int:
    """Programs per class group of a persistent launch: enough to fill the device, never more than tiles."""
    if device.type != "cuda":
        return max(1, min(n_tiles, INTERPRETER_PROGRAMS))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(n_tiles, PROGRAMS_PER_SM * _sm_count(index)))


class Plan(NamedTuple):
    """What ``targets_triton`` launches for a shape: the kernel, its config and constexprs, the class
    groups (programs per row tile), and the autotuner that holds the config (``_autotuned``'s key)."""

    kernel: str
    config: Config
    constexprs: dict
    groups: int
    tuner: tuple


def whole_grid(c_pad: int, s_pad: int, exact: bool, with_head: bool, table: str) -> bool:
    """Whether the launcher takes a grid whole, in programs of up to 128 columns (``class_block``): 16-bit
    embeddings of an aligned width (``table``, ``config_table_name``) on a grid without padding
    (``exact``), with the teacher's head, or of 128 columns with given logits: one program a row tile,
    which reads h once where two of 64 read it twice. Wider grids with given logits keep programs of 64
    (the config spilled 40 B at 8 x 32 under Triton 3.6 on sm_80), as do fp32 and unaligned d, whose
    128-column config was the slower on the H200 (FP32_CONFIGS)."""
    return exact and table == "16-bit" and (with_head or c_pad * s_pad == COLUMNS_PER_PROGRAM)


def plan(d: int, num_classes: int, n_subclasses: int, dtype: torch.dtype, with_head: bool) -> Plan:
    """The launch for embeddings of width ``d`` and ``dtype``: the config list of its program's width."""
    c_pad, s_pad = padded_grid(num_classes, n_subclasses)
    exact = (c_pad, s_pad) == (num_classes, n_subclasses)
    table = config_table_name(dtype, aligned(d))
    whole = whole_grid(c_pad, s_pad, exact, with_head, table)
    c_block = class_block(c_pad, s_pad, whole)
    name = config_class(c_block * s_pad, whole, with_head)
    cfg = _TABLES[table][name][0]  # the autotuner's choice on a GPU; the only one so far
    constexprs = dict(HAS_LOGITS=not with_head, C_PAD=c_pad, S_PAD=s_pad, C_BLOCK=c_block, EXACT=exact,
                      BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
    return Plan("lelp_targets_kernel", cfg, constexprs, triton.cdiv(num_classes, c_block), (name, table))


def kernel_args(embeddings, split: SplitMap, num_classes, n_subclasses, teacher_logits, beta, tau, out) -> tuple:
    """``lelp_targets_kernel``'s run-time arguments, in its order (the head's pointers stand in for
    nothing when logits are given)."""
    n, d = embeddings.shape
    z = teacher_logits if teacher_logits is not None else embeddings
    head = [split.head_hi, split.head_lo, split.head_scale, split.head_bias]
    head = [t if t is not None else split.sub_bias for t in head]  # unused pointers when logits are given
    return (embeddings, embeddings.stride(0), split.sub_hi, split.sub_lo, split.sub_scale, split.sub_bias, *head,
            z, z.stride(0), out, out.stride(0), n, d, num_classes, n_subclasses, limits.inverse_temperature(beta),
            limits.inverse_temperature(tau))


def targets_triton(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out):
    """Launches the kernel; ``weight``/``bias`` are the fused ``[A | Wᵀ]``, ``[e | b]`` (any float dtype
    and device: their split is made on the embeddings' device once, see ``cached_split_map``). One
    subclass per class with given logits is vanilla KD, ``kd_targets``' kernel, which reads no h. Views
    the gates compile no kernel for (``gated``: a pointer off 16 bytes, a row stride of another kind than
    contiguous rows', e.g. the online loss's teacher slices at K = 40 of two teachers) are copied."""
    if limits.vanilla_kd(n_subclasses, teacher_logits is not None):  # vanilla KD: h is not read
        from .kd_targets import kd_targets_triton

        return kd_targets_triton(teacher_logits, tau, out)
    n, d = embeddings.shape
    with_head = teacher_logits is None
    why = limits.targets_unsupported(num_classes, n_subclasses, with_head=with_head, d=d)
    if why:
        raise ValueError(f"the triton targets kernel cannot run: {why}")
    split = cached_split_map(weight, bias, num_classes, n_subclasses, map_dtype(embeddings.dtype), with_head,
                             embeddings.device)
    embeddings, z = gated.gated_input(embeddings, d), gated.gated_input(teacher_logits, num_classes)
    written = gated.gated_output(out, num_classes * n_subclasses)
    p = plan(d, num_classes, n_subclasses, embeddings.dtype, with_head)
    for start, stop in limits.row_pieces(n, ROW_CHUNK):  # N a 32-bit multiple of 16 but in a short tail
        rows = slice(start, stop)
        args = kernel_args(embeddings[rows], split, num_classes, n_subclasses, None if z is None else z[rows], beta,
                           tau, written[rows])
        _launch(args, p, stop - start, embeddings.device)
    return gated.finish_output(written, out)


def _launch(args: tuple, p: Plan, n: int, device: torch.device) -> None:
    """``lelp_targets_kernel`` on ``args`` (``kernel_args``) by plan ``p``: through its autotuner, or
    under the interpreter at the plan's config."""
    if _interpreting():  # the autotuner times configs on a GPU; the interpreter takes the first one
        grid = (row_programs(triton.cdiv(n, p.config.block_n), device) * p.groups,)
        lelp_targets_kernel[grid](*args, **p.constexprs)
    else:
        tuned = {k: v for k, v in p.constexprs.items() if k not in ("BLOCK_N", "BLOCK_D")}
        grid = lambda meta: (row_programs(triton.cdiv(n, meta["BLOCK_N"]), device) * p.groups,)  # noqa: E731
        _autotuned[p.tuner][grid](*args, **tuned)


def launchable_shapes():
    """Every (C, S, with_head) ``targets_triton`` launches ``lelp_targets_kernel`` for (one subclass per
    class with given logits is ``kd_targets``' kernel)."""
    for c in range(1, limits.MAX_SUBCLASS_COLUMNS + 1):
        for s in range(1, limits.MAX_SUBCLASS_COLUMNS // c + 1):
            for with_head in (True, False):
                if not limits.targets_unsupported(c, s, with_head) and not limits.vanilla_kd(s, not with_head):
                    yield c, s, with_head


def _shape_key(num_classes: int, n_subclasses: int) -> tuple:
    """The kinds of C, S and the output's row stride C·S (the given logits' row stride is C)."""
    return tuple(limits.jit_kind(x) for x in (num_classes, n_subclasses, num_classes * n_subclasses))


def jit_key(rows: int, num_classes: int, n_subclasses: int) -> tuple:
    """What a launch's compile takes from its shape beyond the constexprs and the layout (d, h's row
    stride): the kinds of N, C, S and C·S. On the H200 two kernels of one constexpr set held stacks the
    gates' launch of it did not (2026-12-04); N's class changed the registers of 25 of 40 launches
    sampled (session 55)."""
    return (limits.jit_kind(rows), *_shape_key(num_classes, n_subclasses))


def variant_key(variant: dict) -> tuple:
    """What tells a launch (an entry of ``VARIANTS``, or one made alike) apart from the others: its
    dtype, layout, config, constexprs and ``jit_key``."""
    return (variant["dtype"], variant["layout"], variant["config"], tuple(sorted(variant["constexprs"].items())),
            jit_key(variant["rows"], *variant["shape"]))


ROW_COUNTS = limits.ROW_COUNTS  # one row count of each kind the JIT compiles apart: 4 M, 333, 1
ROW_CHUNK = limits.ROW_CHUNK  # the most rows a launch takes


def _variants() -> List[dict]:
    """Every launch ``targets_triton`` can make (of contiguous rows at 16-byte aligned pointers: it passes
    other views as copies, ``gated``), in each of the ``LAYOUTS``: each constexpr set (config included)
    once per ``jit_key``, at ``shape`` (C, S) and ``rows``: ``grid_shape``'s shape first, then the
    smallest C of each other kind of C and S; each at the layout's rows (the launch the gates compiled
    alone until session 55), then the other ``ROW_COUNTS``. ``kernel`` names the kernel function."""
    launches = {}  # (dtype, layout, config, constexprs) -> {_shape_key: (C, S)}
    for dtype, layout in itertools.product(_TL_DTYPES, LAYOUTS):
        for c, s, with_head in launchable_shapes():
            p = plan(LAYOUTS[layout][1], c, s, dtype, with_head)
            shapes = launches.setdefault((_TL_DTYPES[dtype], layout, p.config, tuple(p.constexprs.items())), {})
            shapes.setdefault(_shape_key(c, s), (c, s))
    variants = []
    for (name, layout, config, constexprs), shapes in launches.items():
        constexprs = dict(constexprs)
        first = grid_shape(constexprs["C_PAD"], constexprs["S_PAD"], constexprs["EXACT"])
        others = (s for k, s in shapes.items() if k != _shape_key(*first))
        for shape, rows in itertools.product(dict.fromkeys([first, *others]),
                                             dict.fromkeys([LAYOUTS[layout][0], *ROW_COUNTS])):
            variants.append(dict(kernel="lelp_targets_kernel", dtype=name, config=config, layout=layout,
                                 constexprs=constexprs, shape=shape, rows=rows))
    return variants


def first_of_its_set(variant: dict) -> bool:
    """Whether ``variant`` is its constexpr set's first launch: ``grid_shape``'s shape at the layout's rows
    (the launch the cost model reads, and the one a padded grid's whole twin is compared with)."""
    ce = variant["constexprs"]
    return (variant["shape"] == grid_shape(ce["C_PAD"], ce["S_PAD"], ce["EXACT"])
            and variant["rows"] == LAYOUTS[variant["layout"]][0])


def variant_index(dtype: str, layout: str, p: Plan, num_classes: int, n_subclasses: int) -> int:
    """The index in ``VARIANTS`` of the launch of plan ``p`` for the layout's rows of C x S embeddings of
    ``dtype`` in ``layout``."""
    launch = dict(dtype=dtype, layout=layout, config=p.config, constexprs=p.constexprs,
                  shape=(num_classes, n_subclasses), rows=LAYOUTS[layout][0])
    found = next((i for i, v in enumerate(VARIANTS) if variant_key(v) == variant_key(launch)), None)
    if found is None:
        raise KeyError(f"no variant for {dtype} {layout} C={num_classes} S={n_subclasses}")
    return found


# The first rows and the width of the two layouts, a variant's ``layout`` (``launch_values``): the JIT
# specialises on whether N, d, C, S and the strides are multiples of 16 (and on a value of 1), and
# the hints change the copy pipelines, registers and spills (on the H200 two kernels of S = 1 held
# 1.5-1.9 KB of stack at d = 24 that the gates, compiling every d and stride as divisible, never
# made). "aligned": 4 M rows of d = 768; "unaligned": 333 rows of d = 50 (GloVe's width).
LAYOUTS = {"aligned": (4 << 20, 768), "unaligned": (333, 50)}


def grid_shape(c_pad: int, s_pad: int, exact: bool):
    """A (C, S) the launcher sends to the padded grid (C_PAD, S_PAD): the grid itself when ``exact``,
    else each side one less than its pad where that keeps the pad (the padding masks on)."""
    if exact:
        return c_pad, s_pad
    c, s = (c_pad - 1 if c_pad >= 4 else c_pad), (s_pad - 1 if s_pad >= 4 else s_pad)
    assert padded_grid(c, s) == (c_pad, s_pad) and (c, s) != (c_pad, s_pad), (c_pad, s_pad)
    return c, s


def launch_values(variant: dict) -> dict:
    """The run-time integers of a launch of ``variant`` in its layout, as ``targets_triton`` passes them
    (contiguous rows; a head's launch passes the embeddings as the logits): what the JIT specialises on."""
    n, d = variant["rows"], LAYOUTS[variant["layout"]][1]
    c, s = variant["shape"]
    has_logits = variant["constexprs"]["HAS_LOGITS"]
    return dict(stride_h=d, stride_z=c if has_logits else d, stride_out=c * s, N=n, D=d, C=c, S=s)


# The shapes of the cost model (issue 21: targets of 4 M x 768 at K = 16 and 128; and bench_gpu.py's
# K = 40, five classes of 8 on a padded 8 x 8 grid), as launched.
COST_D = 768
COST_SHAPES = [(4, 4), (16, 8), (5, 8)]
VARIANTS = _variants()


def signature(dtype: str, *, logits_dtype: Optional[str] = None, out_dtype: str = "fp32",
              has_logits: bool = False) -> dict:
    """The kernel's argument types for ahead-of-time compilation (``triton.compile``): embeddings of
    ``dtype``, teacher logits of ``logits_dtype`` (default: ``dtype``), output of ``out_dtype``; with
    ``has_logits`` the head's pointers are the fp32 bias that ``kernel_args`` passes for them."""
    part = _TL_DTYPES[map_dtype(TORCH_DTYPES[dtype])]
    head = "fp32" if has_logits else part
    return {
        "h_ptr": f"*{dtype}", "stride_h": "i32", "sub_hi_ptr": f"*{part}", "sub_lo_ptr": f"*{part}",
        "sub_scale_ptr": "*fp32", "sub_bias_ptr": "*fp32", "head_hi_ptr": f"*{head}", "head_lo_ptr": f"*{head}",
        "head_scale_ptr": "*fp32", "head_bias_ptr": "*fp32", "z_ptr": f"*{logits_dtype or dtype}", "stride_z": "i32",
        "out_ptr": f"*{out_dtype}", "stride_out": "i32", "N": "i32", "D": "i32", "C": "i32", "S": "i32",
        "inv_beta": "fp32", "inv_tau": "fp32",
        **{name: "constexpr" for name in ("HAS_LOGITS", "C_PAD", "S_PAD", "C_BLOCK", "EXACT", "BLOCK_N", "BLOCK_D")},
    }


def available() -> bool:
    """Triton kernels run on CUDA devices, or anywhere under TRITON_INTERPRET=1."""
    return torch.cuda.is_available() or _interpreting()
