"""Triton kernel of the fused distillation loss: per-row loss and dL/ds in one pass.

Same math as ``csrc/include/lelp/loss_math.h`` (see its header comment): every divergence from
log-probabilities, fp32 throughout. Precomputed targets, optionally M teachers mixed by per-row
weights in the kernel; online targets are computed first by the targets kernel into an fp32
buffer (``ops/loss.py``), so the loss reads the student once and writes the gradient once.

At the floor (issue 21): one pass reads s and t and writes the gradient, in the dtype of the
pointer it is given (the student's, from ``ops/loss.py``), already multiplied by τ and by the
reduction's scale (``scale_ptr``: 1/rows for the mean), so no N x K pass follows in the backward.
Where no gradient is wanted (``torch.no_grad()``, logits that do not require it) the kernel is
compiled without it (``WITH_GRAD``): it reads s and t and writes the row losses only.
Exponentials and logarithms are ``exp2``/``log2`` (one MUFU op each) on inputs scaled once by
log2(e)/τ; a plain KL row costs two ``exp2`` per element (the student's softmax and the
teacher's probabilities) and one ``log2`` per row (its log-partition; the KL is summed as
``Σ t (log t - v ln 2) + log Z · Σ t`` with ``v = (s - max s) log2(e)/τ``). The hard-label term
(α ≠ 0, ``HARD``) reuses the softmax's exponentials, taken against the labelled class's own max
inside that class: at τ = 1 they are its exp(s - max), at τ = 2 their squares; any other τ takes
one more ``exp2`` per element. One pass either way; the class log-sum-exp comes from the same
exponentials summed per class, so it never underflows against the row max.
The KL step at a subclass weight λ ≠ 1 (the library's default loss, λ = 0.1) is one pass too for
up to ``limits.MAX_FUSED_WEIGHTED_CLASSES`` classes (``SUBCLASS_WEIGHTED``, ``_weighted_kl_block``: the rows
as class tiles, each thread holding whole classes, ``weighted_block_shape``).

Rows are whole in registers. K = C·S, S and the block's column pieces are compile-time
constants: the first piece is BLOCK_K columns (a power of two), an optional second piece the
BLOCK_K2 columns after it (a quarter or half of BLOCK_K), so K = 40 is 32 + 8 columns, not 64
(``block_shape``). Rows are contiguous (stride K), so the compiler sees their alignment and
vectorises the loads, and ``col // S`` is a multiply, not a division. A NaN anywhere in a row
gives a NaN loss and gradient for that row (never a finite one; TVD's gradient excepted, see
``tests/test_ops_loss.py``). Tested on CPU under ``TRITON_INTERPRET=1`` against the fp64
reference; ``VARIANTS`` is compiled ahead of time for sm_80/sm_90 (``tests/test_triton_aot.py``).
"""

from __future__ import annotations

import itertools
from typing import List, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from . import gated, limits
from .fast_math import FAST_MATH


NEG_INF = tl.constexpr(float("-inf"))
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # the smallest normal fp32: the fast log2 flushes below it
# Elements of the first column piece per program: 16 fp32 values per thread and array at 4 warps.
# 4096 (32 per thread) spilled at K = 40 (JS with weights and labels, fp32) and K = 512 (TVD: 24 B
# under Triton 3.9; about 11 KB under 3.6, as read from the CUBINs by tests/test_triton_aot.py).
ELEMENTS_PER_PROGRAM = 2048
# Rows per program at most: short rows (K = 2) at 2048 rows made each per-row vector 16 values per
# thread, and the dozen of them spilled (8 B stack at K = 2).
MAX_ROWS_PER_PROGRAM = 256


def _prev_pow2(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _plain(divergence: int) -> bool:
    """The KL step, with or without the hard-label term: chunked rows, full tiles. The other
    divergences hold half as many rows, unchunked; KL at a subclass weight λ ≠ 1 has its own tiles
    (``weighted_block_shape``)."""
    return divergence == 0


def block_shape(k: int, divergence: int = 0):
    """(BLOCK_N, BLOCK_K, BLOCK_K2, num_warps): the whole row in registers as a power-of-two piece
    of BLOCK_K columns and, when K is not a power of two but at most 1.5 BLOCK_K, a second piece of
    BLOCK_K2 = BLOCK_K/4 or BLOCK_K/2 columns after it (K = 40: 32 + 8; 36: 32 + 8, 4 padded; 48:
    32 + 16); otherwise (and below 8 columns) one piece of next_pow2(K). Two sizes of second piece,
    not every power of two: each is one more shape to compile (``VARIANTS``). 4 warps. Rows: the
    KL step (with or without the hard-label term) holds 1.25 x ELEMENTS_PER_PROGRAM elements
    rounded down to a power of two of rows (ELEMENTS_PER_PROGRAM // BLOCK_K for one piece and for
    32 + 8), and with a half-width second piece (``_half_piece``) 1024 / BLOCK_K2 rows, so that
    its chunks fill the 128 threads (24 values per thread); the other divergences, with more live
    arrays, half as many (at 16 values per thread JS and TVD with labels spilled 8-16 B under
    Triton 3.6 or on sm_80)."""
    k1 = _prev_pow2(max(2, k))
    if k == k1 or k1 < 8 or k - k1 > k1 // 2:
        block_k, block_k2 = (k1 if k == k1 else 2 * k1), 0
    else:
        block_k, block_k2 = k1, max(k1 // 4, triton.next_power_of_2(k - k1))
    elements = ELEMENTS_PER_PROGRAM if _plain(divergence) else ELEMENTS_PER_PROGRAM // 2
    block_n = min(_prev_pow2(elements * 5 // 4 // (block_k + block_k2)), MAX_ROWS_PER_PROGRAM)
    if _half_piece(block_k, block_k2, divergence):
        block_n = min(8 * 32 * 4 // block_k2, MAX_ROWS_PER_PROGRAM)
    return block_n, block_k, block_k2, 4


# Elements (padded) of the λ ≠ 1 step's tile per program: 16 per thread and array at 4 warps
# (4096 spilled 24-72 B, with teacher weights and the α term and in fp32 8 x 16 at τ = 2; 1024 took
# 7-14 % more SASS instructions per element at the cost shapes without labels; Triton 3.9, sm_90).
WEIGHTED_ELEMENTS_PER_PROGRAM = 2048


# Real elements of the classes one thread holds in a gathered tile (``class_groups``), and their
# padded slots: more classes per thread share the per-row work and its shuffles among more elements.
# With teacher weights (the teachers mixed in the kernel) 30 elements per thread spilled 16-152 B at
# 255 registers and 20 spilled 8 B once (13 x 5, Triton 3.6, sm_90); at 16 none of the 60 such
# launches does (each compiled for sm_80 bf16 and sm_90 bf16/fp32 under Triton 3.6 and 3.9).
# Without them 36 (was 32: 5 x 12 then took 4 threads of 2 classes, 8 class slots for 5, 1.53-1.58x
# the H200's floor with the α term at τ = 2; 3 classes on 2 threads: 1.12-1.26x) and at most 11
# classes a thread (11 x 3 in one thread: up to 1.62 -> 1.12-1.20x, 168-232 registers; 12 x 3 in one
# took all 255, so it keeps 2 threads of 6). The 31 launches these limits changed, each compiled
# with the α term at any τ for sm_80 bf16 and sm_90 bf16/fp32 under Triton 3.6 and 3.9, have no
# stack (2026-12-03).
MAX_GROUP_ELEMENTS = {False: 36, True: 16}  # by whether the launch mixes teachers
MAX_GROUP_CLASSES = 11
MAX_GROUP_SLOTS = 64


def class_groups(num_classes: int, n_subclasses: int, has_weights: bool = False):
    """(T, G): a row's classes over T threads (a power of two), G whole classes each (class
    c = t G + g), for the gathered tile (S not a power of two, S <= 16): the fewest class slots
    T G (padded classes cost a thread's work; padded subclasses and G_PAD - G classes within a
    thread cost nothing), then the most classes per thread, within MAX_GROUP_ELEMENTS elements,
    MAX_GROUP_CLASSES classes and MAX_GROUP_SLOTS slots. Other tiles: one class per thread, T = C_PAD,
    G = 1."""
    s_pad = triton.next_power_of_2(n_subclasses)
    c_pad = triton.next_power_of_2(num_classes)
    if s_pad == n_subclasses or s_pad > 16:
        return c_pad, 1
    fits = []
    t = 1
    while t <= c_pad:
        g = -(-num_classes // t)
        if (g * n_subclasses <= MAX_GROUP_ELEMENTS[bool(has_weights)] and g <= MAX_GROUP_CLASSES
                and triton.next_power_of_2(g) * s_pad <= MAX_GROUP_SLOTS):
            fits.append((t * g, -g, t))
        t *= 2
    _, minus_g, t = min(fits)
    return t, -minus_g


def weighted_block_shape(num_classes: int, n_subclasses: int, has_weights: bool = False):
    """(BLOCK_N, BLOCK_K, S_PAD, G_PAD, num_warps) of the KL step at a subclass weight λ ≠ 1: rows as
    class tiles of powers of two (``_weighted_kl_block``), T threads per row holding G of its
    classes each (``class_groups``; G_PAD = next_pow2(G)), BLOCK_K = T · G_PAD · S_PAD slots per row
    (C_PAD · S_PAD at G = 1; <= 1024 for K <= 512). G > 1: one row per T threads (BLOCK_N = 128 / T);
    G = 1: WEIGHTED_ELEMENTS_PER_PROGRAM slots per program."""
    s_pad = triton.next_power_of_2(n_subclasses)
    t, g = class_groups(num_classes, n_subclasses, has_weights)
    g_pad = triton.next_power_of_2(g)
    block_k = t * g_pad * s_pad
    num_warps = 4
    if g > 1:
        return 32 * num_warps // t, block_k, s_pad, g_pad, num_warps
    return max(1, min(WEIGHTED_ELEMENTS_PER_PROGRAM // block_k, MAX_ROWS_PER_PROGRAM)), block_k, s_pad, 1, num_warps


def _half_piece(block_k: int, block_k2: int, divergence: int) -> bool:
    """A KL row of a power of two and a half (K = 24, 48, 96, 192, 384): held as chunks of
    BLOCK_K2 columns (8 bf16 or 2 x 4 fp32 per thread and chunk: 24 values of a row per thread), so
    both pieces have the same layout. As (BLOCK_N, W) pieces their rows fell in different threads
    and Triton 3.9 recomputed the first piece's exponentials in the second's layout (3.33 MUFU
    and 38 instructions per bf16 element at K = 48, 42 at K = 384)."""
    return _plain(divergence) and block_k2 >= 8 and block_k2 * 2 == block_k


def hard_mode(alpha: float, tau: float, has_labels: bool) -> int:
    """The kernel's HARD: 0 without the hard-label term (no labels, or alpha = 0); else how it gets
    exp(s - max) from the softmax's 2^((s - max) log2(e)/τ): 1 the same value (τ = 1), 2 its
    square (τ = 2), 3 another exp2 per element (any other τ)."""
    if not has_labels or float(alpha) == 0.0:
        return 0
    return {1.0: 1, 2.0: 2}.get(float(tau), 3)


ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def _row_axis() -> int:
    """Which axis of a chunked piece holds the rows: the compilers order the two non-contiguous axes
    of a 3-d tile's layout oppositely (read from the TTGIR: Triton 3.6 puts threads on axis 0
    first, 3.9 on axis 1), and the rows must take the threads. Versions between 3.6 and 3.9 are
    taken to follow 3.9 (not checked; only the instruction count depends on it)."""
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return 0 if (major, minor) < (3, 7) else 1


ROW_AXIS = _row_axis()  # of the Triton this process imported


def chunks(block_k: int, block_k2: int, itemsize: int, divergence: int = 0):
    """(J1, J2): a piece of W columns is held as J chunks of W/J columns side by side in each thread,
    so that each thread holds up to 16 elements of one row in 16-byte vectors and a row of W >= 16
    columns is shared by W/16 threads. As (BLOCK_N, W), 16-byte vectors spread a row over
    W·itemsize/16 threads: 32 for fp32 at K = 128, whose five shuffle levels per row reduction (four
    reductions) cost 10 of the 42 instructions per element the cost model read. Two pieces with a
    quarter-width second piece stay (BLOCK_N, W) (J = 1): chunked, their rows fell in different
    threads and the compiler recomputed exponentials in the other piece's layout (3.6 MUFU per
    element at K = 40, bf16); a half-width second piece is chunked in chunks of its own width
    (``_half_piece``), which gives both pieces one layout. Only the KL step (with or without the
    hard-label term) is chunked: JS with labels, chunked, spilled 8 B on sm_80 (ptxas kept to 80
    registers)."""
    if _half_piece(block_k, block_k2, divergence):
        j2 = max(1, itemsize // 2)
        return 2 * j2, j2
    if block_k2 or not _plain(divergence):
        return 1, 1
    return max(1, min(block_k, 16) * itemsize // 16), 1


def chunk_constexprs(constexprs: dict, dtype: str) -> dict:
    """The kernel's J1, J2 and ROW_AXIS for a variant and the student's dtype (``ITEMSIZE`` key),
    under the Triton that imports this module."""
    j1, j2 = (1, 1) if constexprs["SUBCLASS_WEIGHTED"] else chunks(
        constexprs["BLOCK_K"], constexprs["BLOCK_K2"], ITEMSIZE[dtype], constexprs["DIVERGENCE"])
    return dict(J1=j1, J2=j2, ROW_AXIS=ROW_AXIS)


@triton.jit
def _fast_log2(x):
    """log2 in one MUFU op (``lg2.approx.ftz``: inputs below FLT_MIN flush to 0); tl.log2 is
    libdevice's accurate log2f, about 20 instructions."""
    if FAST_MATH:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _log2_probability(x):
    """log2 x of a probability (0 <= x <= 2^100), subnormals included, in one MUFU op:
    ``lg2.approx.ftz`` flushes an input below FLT_MIN to 0 (log -inf, and t (log t - log q) = -inf
    for a subnormal target), so every input is scaled by 2^24 first (exact, no select) and 24 taken
    off after: at most about 3e-6 absolute error in the log, whatever x (about 1e-6 measured in the
    interpreter near x = 1, where libdevice's log2f was accurate to 5e-10). 0 gives -inf, NaN stays NaN. libdevice's
    accurate log2f per element took about 20 instructions and, at λ ≠ 1 with mixed targets, spilled
    8 B under Triton 3.6 (sm_90, bf16 student and fp32 targets, K = 510 and 511)."""
    return _fast_log2(x * 16777216.0) - 24.0


@triton.jit
def _fast_div(x, y):
    """x / y as x · rcp(y) (``div.approx``, 2 ulp); tl.fdiv also checks the range around it."""
    if FAST_MATH:
        return libdevice.fast_dividef(x, y)
    else:
        return tl.fdiv(x, y)


@triton.jit
def _bc(r, ROW_AXIS: tl.constexpr):
    """A per-row vector (BLOCK_N,) broadcast against a piece (ROW_AXIS 0 or 1: rows on that axis,
    chunks on the other of axes 0 and 1, the chunk's columns on axis 2) or against a gathered class
    tile (2: rows on axis 2 of four, 3: on axis 1 of four, ``_load_groups``)."""
    if ROW_AXIS == 0:
        return r[:, None, None]
    elif ROW_AXIS == 1:
        return r[None, :, None]
    elif ROW_AXIS == 2:  # a class tile (S_PAD, G_PAD, BLOCK_N, T)
        return r[None, None, :, None]
    else:  # 3: a class tile as Triton 3.6 loads it, (T, BLOCK_N, G_PAD, S_PAD)
        return r[None, :, None, None]


@triton.jit
def _el(x, IS_ROW: tl.constexpr, ROW_AXIS: tl.constexpr):
    """x, a scalar or (when IS_ROW) a per-row vector, as a factor of a piece's elements."""
    if IS_ROW:
        return _bc(x, ROW_AXIS)
    else:
        return x


@triton.jit
def _rsum(x, ROW_AXIS: tl.constexpr):
    """Row sums of a piece -> (BLOCK_N,)."""
    return tl.sum(tl.sum(x, axis=2), axis=1 - ROW_AXIS)


@triton.jit
def _rmax(x, ROW_AXIS: tl.constexpr):
    return tl.max(tl.max(x, axis=2), axis=1 - ROW_AXIS)


@triton.jit
def _cols(C0: tl.constexpr, W: tl.constexpr, J: tl.constexpr, ROW_AXIS: tl.constexpr):
    """Column index of each element of a piece of W columns from C0, held as J chunks of W/J."""
    if ROW_AXIS == 0:
        chunk = tl.arange(0, J)[None, :, None]
    else:
        chunk = tl.arange(0, J)[:, None, None]
    return C0 + chunk * (W // J) + tl.arange(0, W // J)[None, None, :]


@triton.jit
def _load_piece(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K: tl.constexpr, C0: tl.constexpr, W: tl.constexpr,
                J: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ROW_AXIS: tl.constexpr):
    """Columns C0 .. C0 + W of the block's rows as (J, BLOCK_N, W/J), fp32: s, log t and t (``_load_cols``)."""
    cols = _cols(C0, W, J, ROW_AXIS)
    return _load_cols(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, cols, cols < K, HAS_WEIGHTS, ROW_AXIS)


@triton.jit
def _load_cols(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K: tl.constexpr, cols, in_row, HAS_WEIGHTS: tl.constexpr,
               ROW_AXIS: tl.constexpr):
    """The block's rows at the columns ``cols`` (a 3-d tile, rows on axis ROW_AXIS), fp32: s, log t
    and t; elements outside the rows or ``in_row`` are s = -inf, log t = -inf, t = 0 (no
    exponential, no term, no gradient). Mixed teachers: t = Σ_m w_m t_m (a negative or NaN weight
    gives NaN, a zero weight drops its teacher), log t = log2(t) ln 2."""
    ok = _bc(row_ok, ROW_AXIS) & in_row
    s = tl.load(s_ptr + _bc(rows64, ROW_AXIS) * K + cols, mask=ok, other=NEG_INF).to(tl.float32)
    if HAS_WEIGHTS:
        t = tl.zeros(s.shape, dtype=tl.float32)
        for m in range(0, M):
            w = tl.load(w_ptr + rows64 * M + m, mask=row_ok, other=0.0)
            w = tl.where(w >= 0.0, w, tl.sqrt(w))  # the square root of a negative weight is NaN
            lt_m = tl.load(t_ptr + _bc(rows64, ROW_AXIS) * (M * K) + m * K + cols, mask=ok, other=NEG_INF)
            t += _bc(w, ROW_AXIS) * tl.exp2(lt_m.to(tl.float32) * LOG2E)
        log_t = _log2_probability(t) * LN2
    else:
        log_t = tl.load(t_ptr + _bc(rows64, ROW_AXIS) * K + cols, mask=ok, other=NEG_INF).to(tl.float32)
        t = tl.exp2(log_t * LOG2E)
    return s, log_t, t


@triton.jit
def _store_piece(grad_ptr, g, rows64, row_ok, K: tl.constexpr, C0: tl.constexpr, W: tl.constexpr, J: tl.constexpr,
                 ROW_AXIS: tl.constexpr):
    """Columns C0 .. C0 + W of the gradient, in the dtype of ``grad_ptr``."""
    cols = _cols(C0, W, J, ROW_AXIS)
    _store_cols(grad_ptr, g, rows64, row_ok, K, cols, cols < K, ROW_AXIS)


@triton.jit
def _store_cols(grad_ptr, g, rows64, row_ok, K: tl.constexpr, cols, in_row, ROW_AXIS: tl.constexpr):
    tl.store(grad_ptr + _bc(rows64, ROW_AXIS) * K + cols, g.to(grad_ptr.dtype.element_ty),
             mask=_bc(row_ok, ROW_AXIS) & in_row)


@triton.jit
def _xlogx_ratio(p, log_p, log_x):
    """p (log p - log x) with 0 log 0 = 0; a NaN p stays NaN."""
    return tl.where(p == 0.0, 0.0, p * (log_p - log_x))


@triton.jit
def _terms(log_t, t, v, e, lz, jsd_beta, r_z, DIVERGENCE: tl.constexpr, ROW_AXIS: tl.constexpr):
    """Per element, for divergences 1-3: (the divergence's summand, a = dD/dlog q / q, q): the
    gradient is q (a - Σ q a). v = (s - max s) log2(e)/τ, e = 2^v, lz = log2 Σ e, r_z = 1 / Σ e."""
    q = e * _bc(r_z, ROW_AXIS)
    log_q = (v - _bc(lz, ROW_AXIS)) * LN2
    if DIVERGENCE == 1:  # KL(q || t)
        d = _xlogx_ratio(q, log_q, log_t)
        a = tl.where(q == 0.0, 0.0, log_q - log_t)
    elif DIVERGENCE == 2:  # generalised JSD: m = b t + (1 - b) q (b = 1/2: JS)
        log_m = _log2_probability(jsd_beta * t + (1.0 - jsd_beta) * q) * LN2
        d = jsd_beta * _xlogx_ratio(t, log_t, log_m) + (1.0 - jsd_beta) * _xlogx_ratio(q, log_q, log_m)
        a = tl.where(q == 0.0, 0.0, (1.0 - jsd_beta) * (log_q - log_m))
    else:  # TVD
        d = 0.5 * tl.abs(t - q)
        a = tl.where(q > t, 0.5, tl.where(q < t, -0.5, 0.0))
    return d, a, q


@triton.jit
def _in_class(y, C0: tl.constexpr, W: tl.constexpr, J: tl.constexpr, S: tl.constexpr, ROW_AXIS: tl.constexpr):
    """Whether each element of the piece belongs to class y (padding columns never do: y < C; nor
    does any column when y = -1)."""
    return (_cols(C0, W, J, ROW_AXIS) // S) == _bc(y, ROW_AXIS)


@triton.jit
def _class_max(s, in_y, ROW_AXIS: tl.constexpr):
    return _rmax(tl.where(in_y, s, NEG_INF), ROW_AXIS)


@triton.jit
def _split_sums(e, in_y, ROW_AXIS: tl.constexpr):
    """(Σ over class y, Σ over the other columns) of a piece, per row."""
    return _rsum(tl.where(in_y, e, 0.0), ROW_AXIS), _rsum(tl.where(in_y, 0.0, e), ROW_AXIS)


@triton.jit
def _hard_exp(s, e, in_y, row_max, sy_max, HARD: tl.constexpr, ROW_AXIS: tl.constexpr):
    """f = exp(s - r), r the row's max outside class y and the class's own max inside it (so class
    y's share never underflows against the row max), from the softmax's e = 2^((s - r) log2(e)/τ):
    e itself at τ = 1, e² at τ = 2, another exp2 at any other τ."""
    if HARD == 1:
        f = e
    elif HARD == 2:
        f = e * e
    else:
        f = tl.exp2((s - tl.where(in_y, _bc(sy_max, ROW_AXIS), _bc(row_max, ROW_AXIS))) * LOG2E)
    return f


@triton.jit
def _select(in_y, a_in, a_out, ROW_AXIS: tl.constexpr):
    """Per element: the row's a_in inside class y, a_out outside it."""
    return tl.where(in_y, _bc(a_in, ROW_AXIS), _bc(a_out, ROW_AXIS))


@triton.jit
def _load_classes(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
                  HAS_WEIGHTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_AXIS: tl.constexpr):
    """s, log t, t of the block's rows as (S_PAD, BLOCK_N, C_PAD) tiles, C_PAD = BLOCK_K // S_PAD:
    subclass j of class c at [j, row, c]. S a power of two: the row's contiguous columns (16-byte
    vectors), reshaped. Otherwise gathered at columns c S + (S - 1 - j), padded subclasses and
    classes masked, so that each thread holds whole classes (a class's sum or max is then a
    reduction within the thread): reversed, the compiler sees no contiguity along j, so its layout
    spreads the threads over the axis it takes first among equals, the last under Triton 3.9 and
    the first under 3.6 (``_row_axis``); the classes are put on that axis, the subclasses on the
    other end. Also returns the columns and their mask, for the gradient's store (``_store_classes``)."""
    if S == S_PAD:
        cols = tl.arange(0, BLOCK_K)[None, None, :]
        in_row = cols < K
        s, lt, t = _load_cols(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, cols, in_row, HAS_WEIGHTS, 0)
        s = tl.permute(tl.reshape(s, (BLOCK_N, BLOCK_K // S_PAD, S_PAD)), (2, 0, 1))
        lt = tl.permute(tl.reshape(lt, (BLOCK_N, BLOCK_K // S_PAD, S_PAD)), (2, 0, 1))
        t = tl.permute(tl.reshape(t, (BLOCK_N, BLOCK_K // S_PAD, S_PAD)), (2, 0, 1))
    elif ROW_AXIS == 1:  # Triton 3.9: classes on the last axis
        sub = (S - 1) - tl.arange(0, S_PAD)[:, None, None]
        cls = tl.arange(0, BLOCK_K // S_PAD)[None, None, :]
        cols = cls * S + sub
        in_row = (sub >= 0) & (cls < K // S)
        s, lt, t = _load_cols(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, cols, in_row, HAS_WEIGHTS, 1)
    else:  # Triton 3.6: classes on the first axis, then the tile transposed
        sub = (S - 1) - tl.arange(0, S_PAD)[None, None, :]
        cls = tl.arange(0, BLOCK_K // S_PAD)[:, None, None]
        cols = cls * S + sub
        in_row = (sub >= 0) & (cls < K // S)
        s, lt, t = _load_cols(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, cols, in_row, HAS_WEIGHTS, 1)
        s, lt, t = tl.permute(s, (2, 1, 0)), tl.permute(lt, (2, 1, 0)), tl.permute(t, (2, 1, 0))
    return s, lt, t, cols, in_row


@triton.jit
def _store_classes(grad_ptr, g, rows64, row_ok, K: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, cols, in_row,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_AXIS: tl.constexpr):
    """The gradient's (S_PAD, BLOCK_N, C_PAD) tile at the columns ``_load_classes`` read."""
    if S == S_PAD:
        g = tl.reshape(tl.permute(g, (1, 2, 0)), (BLOCK_N, 1, BLOCK_K))
        _store_cols(grad_ptr, g, rows64, row_ok, K, cols, in_row, 0)
    elif ROW_AXIS == 1:
        _store_cols(grad_ptr, g, rows64, row_ok, K, cols, in_row, 1)
    else:
        _store_cols(grad_ptr, tl.permute(g, (2, 1, 0)), rows64, row_ok, K, cols, in_row, 1)


@triton.jit
def _class_el(x, IS_ROW: tl.constexpr, GROUPED: tl.constexpr):
    """x, a scalar or (when IS_ROW) a per-row vector, as a factor of a per-class value."""
    if IS_ROW:
        return _cls_row(x, GROUPED)
    else:
        return x


@triton.jit
def _load_groups(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
                 G_PAD: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_K: tl.constexpr, ROW_AXIS: tl.constexpr):
    """``_load_classes`` with G classes per thread (``class_groups``; S not a power of two): s, log t,
    t as (S_PAD, G_PAD, BLOCK_N, T) tiles, T = BLOCK_K // (S_PAD G_PAD), subclass j of class
    c = t G + g at [j, g, row, t], gathered at columns c S + (S - 1 - j). The threads along the
    classes go on the axis the compiler fills first, the rows next to it, the subclasses and class
    slots (within a thread) on the other end (Triton 3.6's tile is then transposed)."""
    C: tl.constexpr = K // S
    T: tl.constexpr = BLOCK_K // (S_PAD * G_PAD)
    G: tl.constexpr = (C + T - 1) // T
    if ROW_AXIS == 1:  # Triton 3.9: the threads along the classes on the last axis
        sub = (S - 1) - tl.arange(0, S_PAD)[:, None, None, None]
        g = tl.arange(0, G_PAD)[None, :, None, None]
        cls = tl.arange(0, T)[None, None, None, :] * G + g
        cols = cls * S + sub
        in_row = (sub >= 0) & (g < G) & (cls < C)
        s, lt, t = _load_cols(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, cols, in_row, HAS_WEIGHTS, 2)
    else:  # Triton 3.6: on the first axis, then the tile transposed
        sub = (S - 1) - tl.arange(0, S_PAD)[None, None, None, :]
        g = tl.arange(0, G_PAD)[None, None, :, None]
        cls = tl.arange(0, T)[:, None, None, None] * G + g
        cols = cls * S + sub
        in_row = (sub >= 0) & (g < G) & (cls < C)
        s, lt, t = _load_cols(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, cols, in_row, HAS_WEIGHTS, 3)
        s, lt, t = tl.permute(s, (3, 2, 1, 0)), tl.permute(lt, (3, 2, 1, 0)), tl.permute(t, (3, 2, 1, 0))
    return s, lt, t, cols, in_row


@triton.jit
def _store_groups(grad_ptr, g, rows64, row_ok, K: tl.constexpr, cols, in_row, ROW_AXIS: tl.constexpr):
    """The gradient's (S_PAD, G_PAD, BLOCK_N, T) tile at the columns ``_load_groups`` read."""
    if ROW_AXIS == 1:
        _store_cols(grad_ptr, g, rows64, row_ok, K, cols, in_row, 2)
    else:
        _store_cols(grad_ptr, tl.permute(g, (3, 2, 1, 0)), rows64, row_ok, K, cols, in_row, 3)


@triton.jit
def _cls_row(r, GROUPED: tl.constexpr):
    """A per-row vector (BLOCK_N,) as a factor of a per-class value: (BLOCK_N, C_PAD), or
    (G_PAD, BLOCK_N, T) when GROUPED."""
    if GROUPED:
        return r[None, :, None]
    else:
        return r[:, None]


@triton.jit
def _cls_el(x, GROUPED: tl.constexpr):
    """A per-class value as a factor of the class tile's elements."""
    if GROUPED:
        return x[None, :, :, :]
    else:
        return x[None, :, :]


@triton.jit
def _cls_rsum(x, GROUPED: tl.constexpr):
    """Row sums of a per-class value (GROUPED: within each thread, then over its T threads)."""
    if GROUPED:
        return tl.sum(tl.sum(x, axis=0), axis=1)
    else:
        return tl.sum(x, axis=1)


@triton.jit
def _cls_rmax(x, GROUPED: tl.constexpr):
    """Row maxima of a per-class value."""
    if GROUPED:
        return tl.max(tl.max(x, axis=0), axis=1)
    else:
        return tl.max(x, axis=1)


@triton.jit
def _store_row_losses(loss_ptr, hard_ptr, loss, ce, rows64, row_ok, keep, HAS_LABELS: tl.constexpr,
                      HARD: tl.constexpr):
    """Each row's loss (plus the hard-label term ``ce`` when HARD > 0, stored apart too); an ignored
    row's is 0."""
    if HAS_LABELS:
        if HARD > 0:
            loss += ce
            tl.store(hard_ptr + rows64, ce, mask=row_ok)
        loss = tl.where(keep, loss, 0.0)
    tl.store(loss_ptr + rows64, loss, mask=row_ok)


@triton.jit
def _weighted_kl_block(s_ptr, t_ptr, w_ptr, loss_ptr, hard_ptr, grad_ptr, rows64, row_ok, M, tau, alpha, lam, scale,
                       c_tau, keep, y, K: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, G_PAD: tl.constexpr,
                       HAS_WEIGHTS: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_AXIS: tl.constexpr, WITH_GRAD: tl.constexpr):
    """The KL step at subclass weight λ ≠ 1 (``SUBCLASS_WEIGHTED``), one pass over the block's rows:
    ``τ² [λ KL(t‖q) + (1 − λ) KL(p‖Q)]`` (p_c, Q_c the class sums of t and q) and its gradient
    ``τ [q Σt − λ t − (1 − λ) p_c q / Q_c]``, plus the hard-label term when HARD > 0.

    The rows are (S_PAD, BLOCK_N, C_PAD) tiles, one class per thread (``_load_classes``), or
    (S_PAD, G_PAD, BLOCK_N, T) tiles, G classes per thread (GROUPED, ``_load_groups``): per-class
    values are (BLOCK_N, C_PAD) or (G_PAD, BLOCK_N, T), computed once per class, not once per
    element and class (a loop over the classes with masked row reductions cost about 17 bf16 /
    32 fp32 SASS instructions per element and class at K = 128). The softmax's exponentials are
    taken against each class's own max, f = 2^((s − m_c) log2(e)/τ), so a class's sum F_c >= 1 and
    q/Q_c = f/F_c never underflows (a class far below the row max: its q is 0, its share of the class
    term is not); q = f en / Z with en = 2^((m_c − max) log2(e)/τ) per class and Z = Σ_c F_c en_c.
    Padded classes take the row max as their shift (finite: F_c = p_c = 0, no term)."""
    C: tl.constexpr = K // S
    GROUPED: tl.constexpr = G_PAD > 1
    c1 = LOG2E / tau
    # the label's class (-1 for ignored rows) as 32 bits: the 64-bit label, kept to the end for the
    # comparisons, spilled on sm_80 (8 B, one C = 8, S = 5 launch with teacher weights)
    y_class = tl.where(keep, y, -1).to(tl.int32)
    if GROUPED:
        T: tl.constexpr = BLOCK_K // (S_PAD * G_PAD)
        G: tl.constexpr = (C + T - 1) // T
        s, lt, t, cols, in_row = _load_groups(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, S, S_PAD, G_PAD, HAS_WEIGHTS,
                                              BLOCK_K, ROW_AXIS)
        g = tl.arange(0, G_PAD)[:, None, None]
        cls = tl.arange(0, T)[None, None, :] * G + g  # (G_PAD, 1, T): each class slot's class
        real = (g < G) & (cls < C)  # not a padded class
        in_y = (cls == y_class[None, :, None]) & (g < G)  # a thread's padded slots name the next thread's classes
    else:
        s, lt, t, cols, in_row = _load_classes(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, S, S_PAD, HAS_WEIGHTS,
                                               BLOCK_N, BLOCK_K, ROW_AXIS)
        cls = tl.arange(0, BLOCK_K // S_PAD)[None, :]  # (1, C_PAD)
        real = cls < C  # not a padded class
        in_y = cls == y_class[:, None]
    m = tl.max(s, axis=0)
    row_max = _cls_rmax(m, GROUPED)
    rm = _cls_row(row_max, GROUPED)
    sh = tl.where(real, m, rm)  # each class's max m_c; the row max in padding
    en = tl.exp2((sh - rm) * c1)
    f = tl.exp2(s * c1 - _cls_el(sh * c1, GROUPED))
    fc = tl.sum(f, axis=0)  # F_c >= 1
    pc = tl.sum(t, axis=0)
    z = _cls_rsum(fc * en, GROUPED)
    sum_t = _cls_rsum(pc, GROUPED)
    lz = _fast_log2(z)  # Z >= 1
    mu = _cls_row(row_max * c1, GROUPED)
    # per class: Σ t (log t - v ln 2) for KL(t‖q), v = (s - max) log2(e)/τ; and p_c (log2 r_c - μ_c) for
    # KL(p‖Q), r_c = p_c / F_c, μ_c = log2 en_c. An r_c below FLT_MIN (p_c < 2^-126 F_c, F_c <= S <= 256)
    # has a term below 2^-110 and is left out. Then one row sum of both (each row sum is shuffles).
    d = tl.sum(tl.where(t == 0.0, 0.0, t * (lt - (s * c1 - _cls_el(mu, GROUPED)) * LN2)), axis=0)
    r = tl.where(real, _fast_div(pc, fc), 0.0)  # F_c >= 1: the fast division's 2 ulp are enough
    pf = tl.where(r < FLT_MIN, 0.0, pc * _fast_log2(r)) - pc * (sh * c1 - mu)
    # KL(t‖q) = Σ_c d_c + ln Z Σt; KL(p‖Q) = Σ_c p_c (ln p_c - ln Q_c) = (Σ_c pf_c + log2 Z Σt) ln 2
    loss = tau * tau * (_cls_rsum(lam * d + ((1.0 - lam) * LN2) * pf, GROUPED) + LN2 * lz * sum_t)
    if GROUPED:
        ct = _el(c_tau, HAS_LABELS, 2)
    else:
        ct = _el(c_tau, HAS_LABELS, 1)
    coef = (en * _cls_row(_fast_div(c_tau * sum_t, z), GROUPED)
            - (1.0 - lam) * _class_el(c_tau, HAS_LABELS, GROUPED) * r)  # per class
    ce = 0.0  # the hard-label term's loss per row (HARD > 0)
    if HARD > 0:
        # alpha (lse(s) - lse over class y) from h = exp(s - m_c) and eh = exp(m_c - max): its sums are
        # Zh = Σ_c H_c eh_c >= 1 and H_y >= 1 (never underflow); d/ds = alpha h (eh / Zh - [y] / H_y)
        if HARD == 1:  # h = f, eh = en
            hc, eh = fc, en
        elif HARD == 2:  # h = f², eh = en²
            h = f * f
            hc, eh = tl.sum(h, axis=0), en * en
        else:
            h = tl.exp2((s - _cls_el(sh, GROUPED)) * LOG2E)
            hc, eh = tl.sum(h, axis=0), tl.exp2((sh - rm) * LOG2E)
        zh = _cls_rsum(hc * eh, GROUPED)
        hy = tl.where(keep, _cls_rsum(tl.where(in_y, hc, 0.0), GROUPED), 1.0)
        my = tl.where(keep, _cls_rmax(tl.where(in_y, sh, NEG_INF), GROUPED), row_max)
        ce = tl.where(keep, alpha * ((row_max - my) + _fast_log2(_fast_div(zh, hy)) * LN2), 0.0)
        hcoef = (eh * _cls_row(_fast_div(scale * alpha, zh), GROUPED)
                 - tl.where(in_y, _cls_row(_fast_div(scale * alpha, hy), GROUPED), 0.0))
        if HARD == 1:
            coef += hcoef
    grad = f * _cls_el(coef, GROUPED) - lam * ct * t
    if HARD > 1:
        grad += h * _cls_el(hcoef, GROUPED)
    _store_row_losses(loss_ptr, hard_ptr, loss, ce, rows64, row_ok, keep, HAS_LABELS, HARD)
    if WITH_GRAD:  # forward only (no gradient wanted): its arithmetic is dead code, compiled out
        if GROUPED:
            _store_groups(grad_ptr, grad, rows64, row_ok, K, cols, in_row, ROW_AXIS)
        else:
            _store_classes(grad_ptr, grad, rows64, row_ok, K, S, S_PAD, cols, in_row, BLOCK_N, BLOCK_K, ROW_AXIS)


@triton.jit
def _mse_step(v1, lt1, v2, lt2, ct, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
              J1: tl.constexpr, J2: tl.constexpr, ROW_AXIS: tl.constexpr):
    """(MSE per row, its gradient's pieces) of the centred logits s/τ and log t: log q - mean log q =
    (v - mean v) ln 2. The second piece (v2, lt2) is read only when BLOCK_K2 > 0."""
    ok1 = _cols(0, BLOCK_K, J1, ROW_AXIS) < K
    v1 = tl.where(ok1, v1, 0.0)
    lt1 = tl.where(ok1, lt1, 0.0)
    mean_v = _rsum(v1, ROW_AXIS)
    mean_t = _rsum(lt1, ROW_AXIS)
    if BLOCK_K2 > 0:
        ok2 = _cols(BLOCK_K, BLOCK_K2, J2, ROW_AXIS) < K
        v2 = tl.where(ok2, v2, 0.0)
        lt2 = tl.where(ok2, lt2, 0.0)
        mean_v += _rsum(v2, ROW_AXIS)
        mean_t += _rsum(lt2, ROW_AXIS)
    mean_v = _bc(mean_v / K, ROW_AXIS)
    mean_t = _bc(mean_t / K, ROW_AXIS)
    err1 = tl.where(ok1, (v1 - mean_v) * LN2 - (lt1 - mean_t), 0.0)
    d = _rsum(err1 * err1, ROW_AXIS)
    g1 = (2.0 / K) * ct * err1
    g2 = g1
    if BLOCK_K2 > 0:
        err2 = tl.where(ok2, (v2 - mean_v) * LN2 - (lt2 - mean_t), 0.0)
        d += _rsum(err2 * err2, ROW_AXIS)
        g2 = (2.0 / K) * ct * err2
    return d / K, g1, g2


@triton.jit
def _divergence_block(s_ptr, t_ptr, w_ptr, loss_ptr, hard_ptr, grad_ptr, rows64, row_ok, M, jsd_beta, tau, alpha, scale,
                      c_tau, keep, y, K: tl.constexpr, S: tl.constexpr, DIVERGENCE: tl.constexpr,
                      HAS_WEIGHTS: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_K2: tl.constexpr, J1: tl.constexpr, J2: tl.constexpr, ROW_AXIS: tl.constexpr,
                      WITH_GRAD: tl.constexpr):
    """The step of any divergence (KL at λ = 1) over the block's rows, held as one or two column
    pieces: the student's softmax, the hard-label term when HARD > 0, the divergence's loss and
    gradient, stored once."""
    c1 = LOG2E / tau
    ct = _el(c_tau, HAS_LABELS, ROW_AXIS)
    s1, lt1, t1 = _load_piece(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, 0, BLOCK_K, J1, HAS_WEIGHTS, ROW_AXIS)
    row_max = _rmax(s1, ROW_AXIS)
    if BLOCK_K2 > 0:
        s2, lt2, t2 = _load_piece(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, BLOCK_K, BLOCK_K2, J2, HAS_WEIGHTS,
                                  ROW_AXIS)
        row_max = tl.maximum(row_max, _rmax(s2, ROW_AXIS))
    # v = (s - max s) log2(e)/τ <= 0 (one FFMA): the softmax of s/τ is 2^v / Σ 2^v.
    mu = _bc(row_max * c1, ROW_AXIS)
    v1 = s1 * c1 - mu
    if BLOCK_K2 > 0:
        v2 = s2 * c1 - mu
    if HARD > 0:
        # alpha CE(y, logsumexp-pool(s)) = alpha (lse(s) - lse over class y), from the softmax's own
        # exponentials: e = 2^u with u = (s - r) log2(e)/τ, r = the row max outside class y and the
        # class's max inside it (an ignored row has no class y: y = -1), so Σ over class y >= 1 and
        # its log never underflows; Z = Σ_not y e + 2^gap Σ_y e, gap = (max_y - max) log2(e)/τ.
        in_y1 = _in_class(tl.where(keep, y, -1), 0, BLOCK_K, J1, S, ROW_AXIS)
        sy_max = _class_max(s1, in_y1, ROW_AXIS)
        if BLOCK_K2 > 0:
            in_y2 = _in_class(tl.where(keep, y, -1), BLOCK_K, BLOCK_K2, J2, S, ROW_AXIS)
            sy_max = tl.maximum(sy_max, _class_max(s2, in_y2, ROW_AXIS))
        sy_max = tl.where(keep, sy_max, row_max)
        share = tl.exp2((sy_max - row_max) * c1)
        e1 = tl.exp2(s1 * c1 - _select(in_y1, sy_max * c1, row_max * c1, ROW_AXIS))
        zy, zn = _split_sums(e1, in_y1, ROW_AXIS)
        if BLOCK_K2 > 0:
            e2 = tl.exp2(s2 * c1 - _select(in_y2, sy_max * c1, row_max * c1, ROW_AXIS))
            zy2, zn2 = _split_sums(e2, in_y2, ROW_AXIS)
            zy += zy2
            zn += zn2
        z = zn + share * zy
    else:
        e1 = tl.exp2(v1)
        z = _rsum(e1, ROW_AXIS)
        if BLOCK_K2 > 0:
            e2 = tl.exp2(v2)
            z += _rsum(e2, ROW_AXIS)
    lz = tl.log2(z)

    ce = 0.0  # the hard-label term's loss per row (HARD > 0)
    if HARD > 0:
        # exp(s - r) and its sums, in the row max's scale outside class y and the class max's inside
        f1 = _hard_exp(s1, e1, in_y1, row_max, sy_max, HARD, ROW_AXIS)
        if BLOCK_K2 > 0:
            f2 = _hard_exp(s2, e2, in_y2, row_max, sy_max, HARD, ROW_AXIS)
        if HARD == 1:  # the softmax's sums are the hard term's
            hy, z_all, lz_all, share_h = zy, z, lz, share
        else:
            hy, hn = _split_sums(f1, in_y1, ROW_AXIS)
            if BLOCK_K2 > 0:
                hy2, hn2 = _split_sums(f2, in_y2, ROW_AXIS)
                hy += hy2
                hn += hn2
            if HARD == 2:
                share_h = share * share
            else:
                share_h = tl.exp2((sy_max - row_max) * LOG2E)
            z_all = hn + share_h * hy
            lz_all = tl.log2(z_all)
        hy = tl.where(keep, hy, 1.0)
        ce = tl.where(keep, alpha * ((row_max - sy_max) + (lz_all - tl.log2(hy)) * LN2), 0.0)
        # d ce / ds = alpha (softmax(s) - the softmax over class y), from f
        h_in = scale * alpha * (share_h / z_all - 1.0 / hy)
        h_out = scale * alpha / z_all
        # the softmax part reads e; inside class y, e is 2^-gap times 2^v
        e_in = share

    if DIVERGENCE == 0:
        # KL(t || q) = Σ t (log t - v ln 2) + ln Z Σ t; grad τ (q Σt - t), not τ (q - t): low-precision
        # targets need not sum to 1. Per element: two exp2, no log.
        sum_t = _rsum(t1, ROW_AXIS)
        d = _rsum(tl.where(t1 == 0.0, 0.0, t1 * (lt1 - v1 * LN2)), ROW_AXIS)
        if BLOCK_K2 > 0:
            sum_t += _rsum(t2, ROW_AXIS)
            d += _rsum(tl.where(t2 == 0.0, 0.0, t2 * (lt2 - v2 * LN2)), ROW_AXIS)
        d += lz * LN2 * sum_t
        a = c_tau * sum_t / z
        if HARD == 0:
            g1 = e1 * _bc(a, ROW_AXIS) - t1 * ct
            if BLOCK_K2 > 0:
                g2 = e2 * _bc(a, ROW_AXIS) - t2 * ct
        elif HARD == 1:  # f = e: one coefficient per element
            g1 = e1 * _select(in_y1, a * e_in + h_in, a + h_out, ROW_AXIS) - t1 * ct
            if BLOCK_K2 > 0:
                g2 = e2 * _select(in_y2, a * e_in + h_in, a + h_out, ROW_AXIS) - t2 * ct
        else:
            g1 = e1 * _select(in_y1, a * e_in, a, ROW_AXIS) + f1 * _select(in_y1, h_in, h_out, ROW_AXIS) - t1 * ct
            if BLOCK_K2 > 0:
                g2 = (e2 * _select(in_y2, a * e_in, a, ROW_AXIS) + f2 * _select(in_y2, h_in, h_out, ROW_AXIS)
                      - t2 * ct)
    elif DIVERGENCE == 4:  # MSE of the centred logits s/τ and log t
        if BLOCK_K2 > 0:
            d, g1, g2 = _mse_step(v1, lt1, v2, lt2, ct, K, BLOCK_K, BLOCK_K2, J1, J2, ROW_AXIS)
        else:  # no second piece: the first stands in for it, unread
            d, g1, g2 = _mse_step(v1, lt1, v1, lt1, ct, K, BLOCK_K, BLOCK_K2, J1, J2, ROW_AXIS)
    else:
        if HARD > 0:  # back to e = 2^v inside class y
            e1 = e1 * tl.where(in_y1, _bc(e_in, ROW_AXIS), 1.0)
            if BLOCK_K2 > 0:
                e2 = e2 * tl.where(in_y2, _bc(e_in, ROW_AXIS), 1.0)
        r_z = 1.0 / z
        d1, a1, q1 = _terms(lt1, t1, v1, e1, lz, jsd_beta, r_z, DIVERGENCE, ROW_AXIS)
        d = _rsum(d1, ROW_AXIS)
        qa = _rsum(q1 * a1, ROW_AXIS)
        if BLOCK_K2 > 0:
            d2, a2, q2 = _terms(lt2, t2, v2, e2, lz, jsd_beta, r_z, DIVERGENCE, ROW_AXIS)
            d += _rsum(d2, ROW_AXIS)
            qa += _rsum(q2 * a2, ROW_AXIS)
        g1 = ct * q1 * (a1 - _bc(qa, ROW_AXIS))
        if BLOCK_K2 > 0:
            g2 = ct * q2 * (a2 - _bc(qa, ROW_AXIS))
    if HARD > 0 and DIVERGENCE != 0:
        g1 += f1 * _select(in_y1, h_in, h_out, ROW_AXIS)
        if BLOCK_K2 > 0:
            g2 += f2 * _select(in_y2, h_in, h_out, ROW_AXIS)
    _store_row_losses(loss_ptr, hard_ptr, tau * tau * d, ce, rows64, row_ok, keep, HAS_LABELS, HARD)
    if WITH_GRAD:  # forward only (no gradient wanted): its arithmetic is dead code, compiled out
        _store_piece(grad_ptr, g1, rows64, row_ok, K, 0, BLOCK_K, J1, ROW_AXIS)
        if BLOCK_K2 > 0:
            _store_piece(grad_ptr, g2, rows64, row_ok, K, BLOCK_K, BLOCK_K2, J2, ROW_AXIS)


@triton.jit
def lelp_loss_kernel(
    s_ptr, t_ptr, w_ptr, y_ptr, scale_ptr, loss_ptr, hard_ptr, grad_ptr,
    N, M, jsd_beta, tau, alpha, ignore_index, subclass_weight,
    K: tl.constexpr, S: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    HAS_LABELS: tl.constexpr, HARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_K2: tl.constexpr, J1: tl.constexpr, J2: tl.constexpr, ROW_AXIS: tl.constexpr,
    SUBCLASS_WEIGHTED: tl.constexpr, S_PAD: tl.constexpr, G_PAD: tl.constexpr, WITH_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    scale = tl.load(scale_ptr)  # the reduction's (1/rows for the mean), folded into the gradient
    keep, y = row_ok, rows  # no labels: every row kept (y unused)
    if HAS_LABELS:
        y = tl.load(y_ptr + rows64, mask=row_ok, other=ignore_index)
        keep = y != ignore_index
        # an ignored row's gradient is 0 (NaN when its inputs are, as in the reference): a per-row
        # factor, not a select per element (which the compiler moved past the cast to 16 bits)
        scale = tl.where(keep, scale, 0.0)
    c_tau = scale * tau

    if SUBCLASS_WEIGHTED:
        _weighted_kl_block(s_ptr, t_ptr, w_ptr, loss_ptr, hard_ptr, grad_ptr, rows64, row_ok, M, tau, alpha,
                           subclass_weight, scale, c_tau, keep, y, K, S, S_PAD, G_PAD, HAS_WEIGHTS, HAS_LABELS, HARD,
                           BLOCK_N, BLOCK_K, ROW_AXIS, WITH_GRAD)
    else:
        _divergence_block(s_ptr, t_ptr, w_ptr, loss_ptr, hard_ptr, grad_ptr, rows64, row_ok, M, jsd_beta, tau, alpha,
                          scale, c_tau, keep, y, K, S, DIVERGENCE, HAS_WEIGHTS, HAS_LABELS, HARD, BLOCK_K, BLOCK_K2,
                          J1, J2, ROW_AXIS, WITH_GRAD)


# The register cap (Triton's ``maxnreg``) of a λ ≠ 1 launch that mixes teachers, at 256 slots a row
# or more. Without one, ptxas took 72 registers and parked 16 and 40 B on the stack (sm_80, Triton
# 3.6: 16 x 16 and 4 x 64 with the α term at τ other than 1 and 2, 6 and 16 local loads and stores
# outside the loops). 128 is the most registers any of these launches took without a cap, so the
# cap leaves each the registers ptxas wanted (96 left a stack in 57-58 of them): with it none of the
# 380 such launches a version holds a stack (sm_80 and sm_90, Triton 3.6 and 3.9; 96-104 registers
# in the middle, 4-5 programs of 4 warps an SM where 72 allowed 7). Which trade runs faster is for a
# GPU to show: benchmarks/loss_cap_ab_gpu.py.
WEIGHTED_MAX_REGISTERS = 128


def max_registers(constexprs: dict) -> Optional[int]:
    """The register cap of a loss launch (``maxnreg``), or None for ptxas's own choice."""
    capped = constexprs["SUBCLASS_WEIGHTED"] and constexprs["HAS_WEIGHTS"] and constexprs["BLOCK_K"] >= 256
    return WEIGHTED_MAX_REGISTERS if capped else None


def register_cap_option(constexprs: dict) -> dict:
    """The launch's ``maxnreg`` keyword where it has a cap, on NVIDIA GPUs only: Triton's AMD backend
    (a ROCm build of torch, whose GPUs are "cuda" devices) refuses the keyword."""
    cap = max_registers(constexprs)
    return {} if cap is None or torch.version.hip else {"maxnreg": cap}


def loss_triton(student, log_targets, weights, labels, num_classes, n_subclasses, divergence, jsd_beta, tau, alpha,
                ignore_index, loss_rows, hard_rows, grad, grad_scale=None, subclass_weight=1.0):
    """Launches the kernel on contiguous inputs; fills ``loss_rows`` (N,), ``grad`` (N, K, in its own
    dtype: ``grad_scale`` (a 1-element fp32 tensor, 1 if None) · dL_row/ds; None: the forward-only
    kernel, which neither computes nor writes a gradient) and, when the hard-label term is on, its
    part ``hard_rows`` (N,) (fp32). ``subclass_weight`` λ ≠ 1 (KL, S > 1, at most
    ``limits.MAX_FUSED_WEIGHTED_CLASSES`` classes): ``τ² [λ KL(t‖q) + (1 − λ) KL(p‖Q)]`` in the same pass."""
    n, k = student.shape
    why = limits.loss_unsupported(num_classes, n_subclasses)
    weighted = float(subclass_weight) != 1.0 and n_subclasses > 1
    if weighted:
        why = why or limits.weighted_loss_unfused(num_classes, n_subclasses, divergence)
    if why:
        raise ValueError(f"the triton loss kernel cannot run: {why}")
    if grad_scale is None:
        grad_scale = torch.ones(1, dtype=torch.float32, device=student.device)
    m = 1 if log_targets.ndim == 2 else log_targets.shape[1]
    has_labels = labels is not None
    if weighted:
        shape = weighted_block_shape(num_classes, n_subclasses, weights is not None)
        (block_n, block_k, s_pad, g_pad, num_warps), block_k2 = shape, 0
    else:
        (block_n, block_k, block_k2, num_warps), s_pad, g_pad = block_shape(k, divergence), 1, 1
    j1, j2 = (1, 1) if weighted else chunks(block_k, block_k2, student.element_size(), divergence)
    constexprs = dict(K=k, S=n_subclasses, DIVERGENCE=divergence, HAS_WEIGHTS=weights is not None,
                      HAS_LABELS=has_labels, HARD=hard_mode(alpha, tau, has_labels), BLOCK_N=block_n, BLOCK_K=block_k,
                      BLOCK_K2=block_k2, J1=j1, J2=j2, ROW_AXIS=ROW_AXIS, SUBCLASS_WEIGHTED=weighted, S_PAD=s_pad,
                      G_PAD=g_pad, WITH_GRAD=grad is not None)
    labels, ignore_index = gated_ignore_index(labels, ignore_index)
    student, log_targets, weights, labels = (gated.gated_input(t) for t in (student, log_targets, weights, labels))
    grad = loss_rows if grad is None else grad  # a forward-only launch is passed the row losses (not written)
    for start, stop in limits.row_pieces(n, ROW_CHUNK):  # N a 32-bit multiple of 16 but in a short tail
        rows = slice(start, stop)
        s, w, y = student[rows], None if weights is None else weights[rows], None if labels is None else labels[rows]
        lelp_loss_kernel[(triton.cdiv(stop - start, block_n),)](
            s, log_targets[rows], s if w is None else w, s if y is None else y, grad_scale, loss_rows[rows],
            hard_rows[rows], grad[rows], stop - start, m, float(jsd_beta), float(tau), float(alpha), ignore_index,
            float(subclass_weight), **constexprs, num_warps=num_warps, **register_cap_option(constexprs))


@triton.jit
def scale_unless_one_kernel(x_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    """x *= scale in place, unless scale == 1: then every program returns before touching x (the
    backward of a loss whose gradient was folded in the forward pass: no N x K pass, no host sync)."""
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        x = tl.load(x_ptr + offs, mask=ok)
        tl.store(x_ptr + offs, (x.to(tl.float32) * scale).to(x_ptr.dtype.element_ty), mask=ok)


SCALE_BLOCK = 4096


def scale_unless_one(x, scale):
    """``x.mul_(scale)`` on a contiguous tensor unless the one-element fp32 ``scale`` is 1, decided
    on the device."""
    flat, scale = x.view(-1), gated.gated_input(scale)  # x: the loss's own gradient; the scale may be a view
    for start, stop in limits.row_pieces(flat.numel(), ROW_CHUNK):  # a 32-bit multiple of 16 but in a short tail
        scale_unless_one_kernel[(triton.cdiv(stop - start, SCALE_BLOCK),)](flat[start:stop], scale, stop - start,
                                                                           BLOCK=SCALE_BLOCK, num_warps=4)


# What the AOT test compiles: every flag combination at a row width that is not a power of two and
# at the widest (K = 40, 512), each divergence at three other block shapes (K = 2, 128, 200), plain
# KL (no weights, no labels: the distillation step the cost model of docs/benchmarks.md reads) at
# K = 16 and 128, and every other block shape block_shape gives for K = 2 .. 512 (the flags are
# what changes the code; each dtype's chunking, chunk_constexprs, comes with the dtype compiled).
# With labels, the hard-label term at any τ (HARD = 3: the most live values); KL with it at τ = 1
# (HARD = 1) at the cost model's K, and at τ = 2 at K = 128 (the gates of tests/test_triton_aot.py).
# Each also forward only (WITH_GRAD off: what a call that wants no gradient launches).
FULL_SHAPES = [(40, 20), (512, 32)]
DIVERGENCE_SHAPES = [(2, 1), (128, 16), (200, 8)]
COST_SHAPES = [(16, 8), (128, 16)]
# The K of the cost model's table (docs/benchmarks.md) and of its gate (tests/test_triton_aot.py)
COST_KS = (16, 40, 128, 512)
HARD_SHAPES = {1: [(16, 8), (40, 20), (128, 16), (512, 32)], 2: [(128, 16)]}


def _variants() -> List[dict]:
    combos = [(shape, div, has_w, has_y, 3 * has_y) for shape, div, has_w, has_y
              in itertools.product(FULL_SHAPES, range(5), (False, True), (False, True))]
    combos += [(shape, div, False, True, 3) for shape, div in itertools.product(DIVERGENCE_SHAPES, range(5))]
    combos += [(shape, 0, False, False, 0) for shape in COST_SHAPES]
    combos += [(shape, 0, False, True, hard) for hard, shapes in HARD_SHAPES.items() for shape in shapes]
    # every other block shape for K = 2 .. 512: as the plain step (KL, chunked rows) and as JS with
    # labels (the most live arrays; the other divergences and flags share its shape)
    # (the K of each that has the most aligned rows: 20 for 16 + 4 columns, not 17)
    covered = {(block_shape(k, div), _plain(div)) for (k, _), div, _, _, _ in combos}
    for div, has_y in ((0, False), (2, True)):
        best = {}
        for k in range(2, limits.MAX_LOSS_K + 1):
            key = (block_shape(k, div), _plain(div))
            if key not in covered and (k & -k) > (best.get(key, 0) & -best.get(key, 0)):
                best[key] = k
        combos += [((k, 1), div, False, has_y, 3 * has_y) for k in sorted(best.values())]
    variants = [dict(num_warps=num_warps, constexprs=dict(
        K=k, S=s, DIVERGENCE=div, HAS_WEIGHTS=has_w, HAS_LABELS=has_y, HARD=hard, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_K2=block_k2, SUBCLASS_WEIGHTED=False, S_PAD=1, G_PAD=1, WITH_GRAD=True))
        for (k, s), div, has_w, has_y, hard in combos
        for block_n, block_k, block_k2, num_warps in [block_shape(k, div)]]
    for (c, s), has_w, has_y, hard in _weighted_combos():
        block_n, block_k, s_pad, g_pad, num_warps = weighted_block_shape(c, s, has_w)
        variants.append(dict(num_warps=num_warps, constexprs=dict(
            K=c * s, S=s, DIVERGENCE=0, HAS_WEIGHTS=has_w, HAS_LABELS=has_y, HARD=hard, BLOCK_N=block_n,
            BLOCK_K=block_k, BLOCK_K2=0, SUBCLASS_WEIGHTED=True, S_PAD=s_pad, G_PAD=g_pad, WITH_GRAD=True)))
    return variants + [dict(v, constexprs={**v["constexprs"], "WITH_GRAD": False}) for v in variants]


def twin_index(i: int) -> int:
    """The index in ``VARIANTS`` of variant ``i`` with the gradient (``WITH_GRAD`` on)."""
    v = VARIANTS[i]
    return VARIANTS.index(dict(v, constexprs={**v["constexprs"], "WITH_GRAD": True}))


# KL at a subclass weight λ ≠ 1 (SUBCLASS_WEIGHTED), as (C, S): at 3 x 4 (a padded class) each
# hard-label mode, with and without teacher weights; the cost model's shapes (the widest classes
# at S = 5, 8, 16 and 64, 16 classes at S = 8 and 5, and 12 x 10: three classes of 10 in 4 x 16
# slots per thread) without labels and at τ = 1, 2; then every tile the launcher gives for
# K <= 512 and C <= limits.MAX_FUSED_WEIGHTED_CLASSES (its block shape, and whether S is a power
# of two: contiguous rows or gathered classes), with the most live values (teacher weights, the
# hard-label term at any τ), and C = 8, S = 5 with them.
WEIGHTED_COST_SHAPES = [(2, 8), (8, 5), (8, 16), (8, 64), (16, 8), (12, 10), (16, 5)]
# And at the class groups' limits (``class_groups``: 3 classes of 12 a thread, 11 of 3 in one), with
# the hard-label term at τ = 2, held to the loss's time budget (cost.weighted_time_gated).
WEIGHTED_GROUP_SHAPES = [(5, 12), (11, 3)]


def weighted_tile(num_classes: int, n_subclasses: int, has_weights: bool = False):
    """The λ ≠ 1 step's layout: (block shape, S a power of two). Launches of one layout differ in
    their flags and in how many of its slots hold elements (``weighted_load``)."""
    return weighted_block_shape(num_classes, n_subclasses, has_weights), n_subclasses & (n_subclasses - 1) == 0


def weighted_load(num_classes: int, n_subclasses: int, has_weights: bool = False) -> int:
    """Elements of a row that one thread of a tile holds, what its registers grow with within the tile:
    G·S with G classes per thread, else the row's C·S (compared only within one tile)."""
    _, g = class_groups(num_classes, n_subclasses, has_weights)
    return g * n_subclasses if g > 1 else num_classes * n_subclasses


def weighted_shapes():
    """Every (C, S) the launcher sends to the λ ≠ 1 step (``limits.weighted_loss_unfused``)."""
    return [(c, s) for c in range(2, limits.MAX_FUSED_WEIGHTED_CLASSES + 1)
            for s in range(2, limits.MAX_LOSS_K // c + 1)]


def _weighted_combos():
    combos = [((3, 4), has_w, True, hard) for has_w, hard in itertools.product((False, True), (0, 3))]
    combos += [((3, 4), False, has_y, hard) for has_y, hard in ((False, 0), (True, 1), (True, 2))]
    combos += [(shape, False, has_y, hard) for shape in WEIGHTED_COST_SHAPES
               for has_y, hard in ((False, 0), (True, 1), (True, 2))]
    combos += [(shape, False, True, 2) for shape in WEIGHTED_GROUP_SHAPES]
    # per tile, the launch with the most elements per thread (``weighted_load``) with the hard-label term
    # at any τ, with teacher weights; and without them where a launch holds more (up to 36 elements per
    # thread against 16, ``class_groups``)
    widest = {True: {}, False: {}}
    for has_w, (c, s) in itertools.product((True, False), weighted_shapes()):
        key, load = weighted_tile(c, s, has_w), weighted_load(c, s, has_w)
        held = [weighted_load(*widest[True][key], True)] if key in widest[True] else []
        held += [weighted_load(*widest[has_w][key], has_w)] if key in widest[has_w] else []
        if load > max(held, default=0):
            widest[has_w][key] = (c, s)
    # and C = 8, S = 5 with weights: its 64-bit label once spilled 8 B on sm_80 (Triton 3.9)
    combos += [(shape, True, True, 3) for shape in [*widest[True].values(), (8, 5)]]
    combos += [(shape, False, True, 3) for shape in widest[False].values()]
    return list(dict.fromkeys(combos))


# The teacher counts a launch with teacher weights is compiled at: the gates' first (three, no multiple
# of 16), then one (a constant to the JIT: (N, 1, K) targets with weights) and 16 (hinted). Without
# weights M is 1. ignore_index is -100 or another of its kind (``gated_ignore_index``).
TEACHER_COUNTS = (3, 1, 16)


def _teacher_counts(constexprs: dict):
    return TEACHER_COUNTS if constexprs["HAS_WEIGHTS"] else (1,)


def first_launch(variant: dict) -> bool:
    """Whether ``variant`` is its constexpr set's first launch: ``limits.ROW_COUNTS[0]`` rows and its first
    teacher count (what the cost model reads)."""
    return (variant["rows"] == limits.ROW_COUNTS[0]
            and variant["teachers"] == _teacher_counts(variant["constexprs"])[0])


def _launches(variants: List[dict]) -> List[dict]:
    """Each constexpr set's first launch, in ``variants``' order (their indices are the cases' of before),
    then each at every other pair of the JIT's kinds of N (``limits.ROW_COUNTS``) and M."""
    every = [dict(v, rows=n, teachers=m) for v in variants
             for n, m in itertools.product(limits.ROW_COUNTS, _teacher_counts(v["constexprs"]))]
    return [v for v in every if first_launch(v)] + [v for v in every if not first_launch(v)]


VARIANTS = _launches(_variants())


def variant_index(constexprs: dict, rows: int, teachers: int) -> int:
    """The index in ``VARIANTS`` of the launch the JIT compiles a launch of ``constexprs`` at ``rows`` and
    ``teachers`` as: the one of the same constexprs and the same kinds of N and M (``limits.jit_kind``)."""
    kinds = (limits.jit_kind(rows), limits.jit_kind(teachers))
    found = next((i for i, v in enumerate(VARIANTS) if v["constexprs"] == constexprs
                  and (limits.jit_kind(v["rows"]), limits.jit_kind(v["teachers"])) == kinds), None)
    if found is None:
        raise KeyError(f"no loss variant at {rows} rows and {teachers} teachers of {constexprs}")
    return found


# The ignore_index the gates compile the loss at (``launch_values``). Triton's JIT compiles an integer of
# 1, a multiple of 16 (0 included) or one past 32 bits apart: such an ignore_index is passed as this.
GATED_IGNORE_INDEX = -100
ROW_CHUNK = limits.ROW_CHUNK  # the most rows a launch takes


def gated_ignore_index(labels, ignore_index: int):
    """(labels, ignore_index) as the kernel takes them: as given where ``ignore_index`` is a 32-bit integer
    of ``GATED_IGNORE_INDEX``'s JIT kind (the same kernel), else ``GATED_IGNORE_INDEX`` with the ignored
    rows' labels set to it and labels of -100 to -101 (kept, as before: both outside the classes, of one
    JIT kind); one pass over the labels."""
    ignore_index = int(ignore_index)
    if labels is None or ignore_index == GATED_IGNORE_INDEX:
        return labels, GATED_IGNORE_INDEX
    if limits.jit_kind(ignore_index) == "-" and -2 ** 31 <= ignore_index < 2 ** 31:
        return labels, ignore_index
    kept = torch.where(labels == GATED_IGNORE_INDEX, GATED_IGNORE_INDEX - 1, labels)
    return torch.where(labels == ignore_index, GATED_IGNORE_INDEX, kept), GATED_IGNORE_INDEX


# The backward's conditional scale, per gradient dtype the folded path writes (ops/loss.py).
# Each at 4 M x 16 elements, then at the JIT's other kinds of a count: of no multiple of 16 (333 rows of
# 17) and 1 (a tail of one element, ``limits.row_pieces``).
SCALE_VARIANTS = [dict(dtype=dtype, num_warps=4, constexprs=dict(BLOCK=SCALE_BLOCK), numel=numel)
                  for numel in ((4 << 20) * 16, 333 * 17, 1) for dtype in ("bf16", "fp32")]


def scale_signature(dtype: str) -> dict:
    return {"x_ptr": f"*{dtype}", "scale_ptr": "*fp32", "numel": "i64", "BLOCK": "constexpr"}


def scale_launch_values(variant: dict) -> dict:
    """The run-time integers of a scale launch (what the JIT specialises on): its element count."""
    return dict(numel=variant["numel"])


def launch_values(variant: dict) -> dict:
    """The run-time integers of a launch of ``variant`` (what the JIT specialises on, see ``aot._source``):
    its rows and teachers, and -100 as ignore_index (every value the launcher passes is of its kind,
    ``gated_ignore_index``)."""
    return dict(N=variant["rows"], M=variant["teachers"], ignore_index=GATED_IGNORE_INDEX)


def signature(dtype: str, target_dtype: str, grad_dtype: Optional[str] = None, *, flags: dict) -> dict:
    """The kernel's argument types for ahead-of-time compilation (``triton.compile``): the gradient
    in the student's dtype, as ``ops/loss.py`` allocates it on the folded path, unless ``grad_dtype``
    says (fp32 for fp16 students, whose gradient is not folded). The pointers a variant (its
    constexprs, ``flags``) does not read are typed as ``loss_triton`` passes them: the student for
    absent weights and labels, the fp32 row losses for the gradient of a forward-only launch."""
    return {
        "s_ptr": f"*{dtype}", "t_ptr": f"*{target_dtype}", "w_ptr": "*fp32" if flags["HAS_WEIGHTS"] else f"*{dtype}",
        "y_ptr": "*i64" if flags["HAS_LABELS"] else f"*{dtype}", "scale_ptr": "*fp32", "loss_ptr": "*fp32",
        "hard_ptr": "*fp32", "grad_ptr": f"*{grad_dtype or dtype}" if flags["WITH_GRAD"] else "*fp32", "N": "i32",
        "M": "i32", "jsd_beta": "fp32", "tau": "fp32", "alpha": "fp32", "ignore_index": "i32",
        "subclass_weight": "fp32",
        **{name: "constexpr" for name in ("K", "S", "DIVERGENCE", "HAS_WEIGHTS", "HAS_LABELS", "HARD", "BLOCK_N",
                                          "BLOCK_K", "BLOCK_K2", "J1", "J2", "ROW_AXIS", "SUBCLASS_WEIGHTED",
                                          "S_PAD", "G_PAD", "WITH_GRAD")},
    }
