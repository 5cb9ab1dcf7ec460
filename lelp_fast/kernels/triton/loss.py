"""Triton kernel of the fused distillation loss: per-row loss and dL/ds in one pass.

Same math as ``csrc/include/lelp/loss_math.h`` (see its header comment): every divergence from
log-probabilities, fp32 throughout. Precomputed targets, optionally M teachers mixed by per-row
weights in the kernel; online targets are computed first by the targets kernel into an fp32
buffer (``ops/loss.py``), so the loss reads the student once and writes the gradient once.

At the floor (issue 21): one pass reads s and t and writes the gradient, in the dtype of the
pointer it is given (the student's, from ``ops/loss.py``), already multiplied by τ and by the
reduction's scale (``scale_ptr``: 1/rows for the mean), so no N x K pass follows in the backward.
Exponentials and logarithms are ``exp2``/``log2`` (one MUFU op each) on inputs scaled once by
log2(e)/τ; a plain KL row costs two ``exp2`` per element (the student's softmax and the
teacher's probabilities) and one ``log2`` per row (its log-partition; the KL is summed as
``Σ t (log t - v ln 2) + log Z · Σ t`` with ``v = (s - max s) log2(e)/τ``). The hard-label term
(α ≠ 0, ``HARD``) reuses the softmax's exponentials, taken against the labelled class's own max
inside that class: at τ = 1 they are its exp(s - max), at τ = 2 their squares; any other τ takes
one more ``exp2`` per element. One pass either way; the class log-sum-exp comes from the same
exponentials summed per class, so it never underflows against the row max.
The KL step at a subclass weight λ ≠ 1 (the library's default loss, λ = 0.1) is one pass too for
up to ``limits.MAX_FUSED_WEIGHTED_CLASSES`` classes (``SUBCLASS_WEIGHTED``, ``_weighted_kl_block``).

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
from typing import List

import torch
import triton
import triton.language as tl

from . import limits

NEG_INF = tl.constexpr(float("-inf"))
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Elements of the first column piece per program: 16 fp32 values per thread and array at 4 warps.
# 4096 (32 per thread) spilled at K = 40 (JS with weights and labels, fp32) and K = 512 (TVD: 24 B
# under Triton 3.9; about 11 KB under 3.6, as read from the CUBINs by tests/test_triton_aot.py).
ELEMENTS_PER_PROGRAM = 2048
# Rows per program at most: short rows (K = 2) at 2048 rows made each per-row vector 16 values per
# thread, and the dozen of them spilled (8 B stack at K = 2).
MAX_ROWS_PER_PROGRAM = 256


def _prev_pow2(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _plain(divergence: int, weighted: bool = False) -> bool:
    """The KL step, with or without the hard-label term: chunked rows, full tiles. The other
    divergences, and KL at a subclass weight λ ≠ 1 (more live arrays: each element's class max,
    class scale and p_c/F_c), hold half as many rows, unchunked."""
    return divergence == 0 and not weighted


def block_shape(k: int, divergence: int = 0, weighted: bool = False):
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
    elements = ELEMENTS_PER_PROGRAM if _plain(divergence, weighted) else ELEMENTS_PER_PROGRAM // 2
    block_n = min(_prev_pow2(elements * 5 // 4 // (block_k + block_k2)), MAX_ROWS_PER_PROGRAM)
    if _half_piece(block_k, block_k2, divergence, weighted):
        block_n = min(8 * 32 * 4 // block_k2, MAX_ROWS_PER_PROGRAM)
    return block_n, block_k, block_k2, 4


def _half_piece(block_k: int, block_k2: int, divergence: int, weighted: bool = False) -> bool:
    """A KL row of a power of two and a half (K = 24, 48, 96, 192, 384): held as chunks of
    BLOCK_K2 columns (8 bf16 or 2 x 4 fp32 per thread and chunk: 24 values of a row per thread), so
    both pieces have the same layout. As (BLOCK_N, W) pieces their rows fell in different threads
    and Triton 3.9 recomputed the first piece's exponentials in the second's layout (3.33 MUFU
    and 38 instructions per bf16 element at K = 48, 42 at K = 384)."""
    return _plain(divergence, weighted) and block_k2 >= 8 and block_k2 * 2 == block_k


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


def chunks(block_k: int, block_k2: int, itemsize: int, divergence: int = 0, weighted: bool = False):
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
    if _half_piece(block_k, block_k2, divergence, weighted):
        j2 = max(1, itemsize // 2)
        return 2 * j2, j2
    if block_k2 or not _plain(divergence, weighted):
        return 1, 1
    return max(1, min(block_k, 16) * itemsize // 16), 1


def chunk_constexprs(constexprs: dict, dtype: str) -> dict:
    """The kernel's J1, J2 and ROW_AXIS for a variant and the student's dtype (``ITEMSIZE`` key),
    under the Triton that imports this module."""
    j1, j2 = chunks(constexprs["BLOCK_K"], constexprs["BLOCK_K2"], ITEMSIZE[dtype], constexprs["DIVERGENCE"],
                    constexprs["SUBCLASS_WEIGHTED"])
    return dict(J1=j1, J2=j2, ROW_AXIS=ROW_AXIS)


@triton.jit
def _bc(r, ROW_AXIS: tl.constexpr):
    """A per-row vector (BLOCK_N,) broadcast against a piece (rows on axis ROW_AXIS, chunks on the
    other of axes 0 and 1, the chunk's columns on axis 2)."""
    if ROW_AXIS == 0:
        return r[:, None, None]
    else:
        return r[None, :, None]


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
    """Columns C0 .. C0 + W of the block's rows as (J, BLOCK_N, W/J), fp32: s, log t and t; masked
    elements are s = -inf, log t = -inf, t = 0 (no exponential, no term, no gradient). Mixed
    teachers: t = Σ_m w_m t_m (a negative or NaN weight gives NaN, a zero weight drops its
    teacher), log t = log2(t) ln 2."""
    cols = _cols(C0, W, J, ROW_AXIS)
    ok = _bc(row_ok, ROW_AXIS) & (cols < K)
    s = tl.load(s_ptr + _bc(rows64, ROW_AXIS) * K + cols, mask=ok, other=NEG_INF).to(tl.float32)
    if HAS_WEIGHTS:
        t = tl.zeros(s.shape, dtype=tl.float32)
        for m in range(0, M):
            w = tl.load(w_ptr + rows64 * M + m, mask=row_ok, other=0.0)
            w = tl.where(w >= 0.0, w, tl.sqrt(w))  # the square root of a negative weight is NaN
            lt_m = tl.load(t_ptr + _bc(rows64, ROW_AXIS) * (M * K) + m * K + cols, mask=ok, other=NEG_INF)
            t += _bc(w, ROW_AXIS) * tl.exp2(lt_m.to(tl.float32) * LOG2E)
        log_t = tl.log2(t) * LN2
    else:
        log_t = tl.load(t_ptr + _bc(rows64, ROW_AXIS) * K + cols, mask=ok, other=NEG_INF).to(tl.float32)
        t = tl.exp2(log_t * LOG2E)
    return s, log_t, t


@triton.jit
def _store_piece(grad_ptr, g, rows64, row_ok, K: tl.constexpr, C0: tl.constexpr, W: tl.constexpr, J: tl.constexpr,
                 ROW_AXIS: tl.constexpr):
    """Columns C0 .. C0 + W of the gradient, in the dtype of ``grad_ptr``."""
    cols = _cols(C0, W, J, ROW_AXIS)
    tl.store(grad_ptr + _bc(rows64, ROW_AXIS) * K + cols, g.to(grad_ptr.dtype.element_ty),
             mask=_bc(row_ok, ROW_AXIS) & (cols < K))


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
        log_m = tl.log2(jsd_beta * t + (1.0 - jsd_beta) * q) * LN2
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
def _class_scales(cls, c: tl.constexpr, mc, ec, sh, en, ROW_AXIS: tl.constexpr):
    """Class c's max logit mc and 2^((mc - max) log2(e)/τ) ec written into the elements of class c."""
    in_c = cls == c
    return tl.where(in_c, _bc(mc, ROW_AXIS), sh), tl.where(in_c, _bc(ec, ROW_AXIS), en)


@triton.jit
def _class_sum(x, cls, c: tl.constexpr, ROW_AXIS: tl.constexpr):
    return _rsum(tl.where(cls == c, x, 0.0), ROW_AXIS)


@triton.jit
def _hard_parts(s, f, en, sh, rm, HARD: tl.constexpr):
    """exp(s - m_c) and exp(m_c - max) per element (m_c the element's class max) from the softmax's
    f = 2^((s - m_c) log2(e)/τ) and en = 2^((m_c - max) log2(e)/τ): themselves at τ = 1, squared at
    τ = 2, one exp2 each at any other τ."""
    if HARD == 1:
        return f, en
    elif HARD == 2:
        return f * f, en * en
    else:
        return tl.exp2((s - sh) * LOG2E), tl.exp2((sh - rm) * LOG2E)


@triton.jit
def _weighted_kl_block(s_ptr, t_ptr, w_ptr, loss_ptr, hard_ptr, grad_ptr, rows64, row_ok, M, tau, alpha, lam, scale,
                       c_tau, keep, y, K: tl.constexpr, S: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                       HAS_LABELS: tl.constexpr, HARD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
                       J1: tl.constexpr, J2: tl.constexpr, ROW_AXIS: tl.constexpr):
    """The KL step at subclass weight λ ≠ 1 (``SUBCLASS_WEIGHTED``), one pass over the block's rows:
    ``τ² [λ KL(t‖q) + (1 − λ) KL(p‖Q)]`` (p_c, Q_c the class sums of t and q) and its gradient
    ``τ [q Σt − λ t − (1 − λ) p_c q / Q_c]``, plus the hard-label term when HARD > 0. The softmax's
    exponentials are taken against each class's own max, f = 2^((s − m_c) log2(e)/τ), so a class's
    sum F_c >= 1 and q/Q_c = f/F_c never underflows (a class far below the row max: its q is 0, its
    share of the class term is not); q = f en / Z with en = 2^((m_c − max) log2(e)/τ) per class and
    Z = Σ f en. The C = K // S classes are a static loop of masked row reductions and selects (at
    K = 128 about 17 bf16 / 32 fp32 SASS instructions per element and class, hence
    ``limits.MAX_FUSED_WEIGHTED_CLASSES``)."""
    C: tl.constexpr = K // S
    c1 = LOG2E / tau
    ct = _el(c_tau, HAS_LABELS, ROW_AXIS)
    s1, lt1, t1 = _load_piece(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, 0, BLOCK_K, J1, HAS_WEIGHTS, ROW_AXIS)
    cls1 = _cols(0, BLOCK_K, J1, ROW_AXIS) // S  # padding columns: cls >= C, in no class
    row_max = _rmax(s1, ROW_AXIS)
    if BLOCK_K2 > 0:
        s2, lt2, t2 = _load_piece(s_ptr, t_ptr, w_ptr, rows64, row_ok, M, K, BLOCK_K, BLOCK_K2, J2, HAS_WEIGHTS,
                                  ROW_AXIS)
        cls2 = _cols(BLOCK_K, BLOCK_K2, J2, ROW_AXIS) // S
        row_max = tl.maximum(row_max, _rmax(s2, ROW_AXIS))
    rm = _bc(row_max, ROW_AXIS)
    # each element's class max m_c (the row max in padding: finite shifts there) and 2^((m_c - max) log2(e)/τ)
    sh1 = tl.zeros(s1.shape, dtype=tl.float32) + rm
    en1 = tl.zeros(s1.shape, dtype=tl.float32)
    if BLOCK_K2 > 0:
        sh2 = tl.zeros(s2.shape, dtype=tl.float32) + rm
        en2 = tl.zeros(s2.shape, dtype=tl.float32)
    for c in tl.static_range(C):
        mc = _rmax(tl.where(cls1 == c, s1, NEG_INF), ROW_AXIS)
        if BLOCK_K2 > 0:
            mc = tl.maximum(mc, _rmax(tl.where(cls2 == c, s2, NEG_INF), ROW_AXIS))
        ec = tl.exp2((mc - row_max) * c1)
        sh1, en1 = _class_scales(cls1, c, mc, ec, sh1, en1, ROW_AXIS)
        if BLOCK_K2 > 0:
            sh2, en2 = _class_scales(cls2, c, mc, ec, sh2, en2, ROW_AXIS)
    f1 = tl.exp2(s1 * c1 - sh1 * c1)
    e1 = f1 * en1  # 2^v, v = (s - max) log2(e)/τ: the plain softmax's numerator
    z = _rsum(e1, ROW_AXIS)
    sum_t = _rsum(t1, ROW_AXIS)
    mu = rm * c1
    # Σ t (log t - v ln 2) for KL(t‖q); Σ t μ_c (μ_c = (m_c - max) log2(e)/τ = log2 en) for KL(p‖Q)
    d = _rsum(tl.where(t1 == 0.0, 0.0, t1 * (lt1 - (s1 * c1 - mu) * LN2)), ROW_AXIS)
    tmu = _rsum(t1 * (sh1 * c1 - mu), ROW_AXIS)
    if BLOCK_K2 > 0:
        f2 = tl.exp2(s2 * c1 - sh2 * c1)
        e2 = f2 * en2
        z += _rsum(e2, ROW_AXIS)
        sum_t += _rsum(t2, ROW_AXIS)
        d += _rsum(tl.where(t2 == 0.0, 0.0, t2 * (lt2 - (s2 * c1 - mu) * LN2)), ROW_AXIS)
        tmu += _rsum(t2 * (sh2 * c1 - mu), ROW_AXIS)
    lz = tl.log2(z)
    # per class: F_c = Σ f, p_c = Σ t; Σ p_c log2(p_c / F_c); r = p_c / F_c (= p_c q / Q_c / f) per element
    r1 = tl.zeros(s1.shape, dtype=tl.float32)
    if BLOCK_K2 > 0:
        r2 = tl.zeros(s2.shape, dtype=tl.float32)
    pf = tl.zeros(row_max.shape, dtype=tl.float32)
    for c in tl.static_range(C):
        fc = _class_sum(f1, cls1, c, ROW_AXIS)
        pc = _class_sum(t1, cls1, c, ROW_AXIS)
        if BLOCK_K2 > 0:
            fc += _class_sum(f2, cls2, c, ROW_AXIS)
            pc += _class_sum(t2, cls2, c, ROW_AXIS)
        pf += tl.where(pc == 0.0, 0.0, pc * (tl.log2(pc) - tl.log2(fc)))
        r1 = tl.where(cls1 == c, _bc(pc / fc, ROW_AXIS), r1)
        if BLOCK_K2 > 0:
            r2 = tl.where(cls2 == c, _bc(pc / fc, ROW_AXIS), r2)
    # KL(t‖q) = d + ln Z Σt; KL(p‖Q) = Σ p_c (ln p_c - ln Q_c), ln Q_c = (log2 F_c + μ_c - log2 Z) ln 2
    kl_sub = d + lz * LN2 * sum_t
    kl_cls = (pf - tmu + lz * sum_t) * LN2
    loss = tau * tau * (lam * kl_sub + (1.0 - lam) * kl_cls)
    a = _bc(c_tau * sum_t / z, ROW_AXIS)
    g1 = f1 * (en1 * a - (1.0 - lam) * ct * r1) - lam * ct * t1
    if BLOCK_K2 > 0:
        g2 = f2 * (en2 * a - (1.0 - lam) * ct * r2) - lam * ct * t2
    if HARD > 0:
        # alpha (lse(s) - lse over class y) from exp(s - m_c) = h, exp(m_c - max) = eh: its sums are
        # Zh = Σ h eh >= 1 and Hy = Σ_y h >= 1 (never underflow); d/ds = alpha h (eh / Zh - [y] / Hy)
        yy = tl.where(keep, y, -1)
        in_y1 = cls1 == _bc(yy, ROW_AXIS)
        h1, eh1 = _hard_parts(s1, f1, en1, sh1, rm, HARD)
        zh = _rsum(h1 * eh1, ROW_AXIS)
        hy = _rsum(tl.where(in_y1, h1, 0.0), ROW_AXIS)
        my = _rmax(tl.where(in_y1, sh1, NEG_INF), ROW_AXIS)
        if BLOCK_K2 > 0:
            in_y2 = cls2 == _bc(yy, ROW_AXIS)
            h2, eh2 = _hard_parts(s2, f2, en2, sh2, rm, HARD)
            zh += _rsum(h2 * eh2, ROW_AXIS)
            hy += _rsum(tl.where(in_y2, h2, 0.0), ROW_AXIS)
            my = tl.maximum(my, _rmax(tl.where(in_y2, sh2, NEG_INF), ROW_AXIS))
        hy = tl.where(keep, hy, 1.0)
        my = tl.where(keep, my, row_max)
        ce = tl.where(keep, alpha * ((row_max - my) + (tl.log2(zh) - tl.log2(hy)) * LN2), 0.0)
        w_all = _bc(scale * alpha / zh, ROW_AXIS)
        g1 += h1 * (eh1 * w_all - _select(in_y1, scale * alpha / hy, 0.0 * hy, ROW_AXIS))
        if BLOCK_K2 > 0:
            g2 += h2 * (eh2 * w_all - _select(in_y2, scale * alpha / hy, 0.0 * hy, ROW_AXIS))
    if HAS_LABELS:
        if HARD > 0:
            loss += ce
            tl.store(hard_ptr + rows64, ce, mask=row_ok)
        loss = tl.where(keep, loss, 0.0)
    tl.store(loss_ptr + rows64, loss, mask=row_ok)
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
    SUBCLASS_WEIGHTED: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    c1 = LOG2E / tau
    scale = tl.load(scale_ptr)  # the reduction's (1/rows for the mean), folded into the gradient
    keep, y = row_ok, rows  # no labels: every row kept (y unused)
    if HAS_LABELS:
        y = tl.load(y_ptr + rows64, mask=row_ok, other=ignore_index)
        keep = y != ignore_index
        # an ignored row's gradient is 0 (NaN when its inputs are, as in the reference): a per-row
        # factor, not a select per element (which the compiler moved past the cast to 16 bits)
        scale = tl.where(keep, scale, 0.0)
    c_tau = scale * tau
    ct = _el(c_tau, HAS_LABELS, ROW_AXIS)

    if SUBCLASS_WEIGHTED:
        _weighted_kl_block(s_ptr, t_ptr, w_ptr, loss_ptr, hard_ptr, grad_ptr, rows64, row_ok, M, tau, alpha,
                           subclass_weight, scale, c_tau, keep, y, K, S, HAS_WEIGHTS, HAS_LABELS, HARD, BLOCK_K,
                           BLOCK_K2, J1, J2, ROW_AXIS)
    else:
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
        elif DIVERGENCE == 4:  # MSE of the centred logits s/τ and log t (log q - mean log q = (v - mean v) ln 2)
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
            if BLOCK_K2 > 0:
                err2 = tl.where(ok2, (v2 - mean_v) * LN2 - (lt2 - mean_t), 0.0)
                d += _rsum(err2 * err2, ROW_AXIS)
                g2 = (2.0 / K) * ct * err2
            d = d / K
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
        loss = tau * tau * d

        if HAS_LABELS:
            if HARD > 0:
                loss += ce
                tl.store(hard_ptr + rows64, ce, mask=row_ok)
            loss = tl.where(keep, loss, 0.0)

        tl.store(loss_ptr + rows64, loss, mask=row_ok)
        _store_piece(grad_ptr, g1, rows64, row_ok, K, 0, BLOCK_K, J1, ROW_AXIS)
        if BLOCK_K2 > 0:
            _store_piece(grad_ptr, g2, rows64, row_ok, K, BLOCK_K, BLOCK_K2, J2, ROW_AXIS)


def loss_triton(student, log_targets, weights, labels, num_classes, n_subclasses, divergence, jsd_beta, tau, alpha,
                ignore_index, loss_rows, hard_rows, grad, grad_scale=None, subclass_weight=1.0):
    """Launches the kernel on contiguous inputs; fills ``loss_rows`` (N,), ``grad`` (N, K, in its own
    dtype: ``grad_scale`` (a 1-element fp32 tensor, 1 if None) · dL_row/ds) and, when the hard-label
    term is on, its part ``hard_rows`` (N,) (fp32). ``subclass_weight`` λ ≠ 1 (KL, S > 1, at most
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
    block_n, block_k, block_k2, num_warps = block_shape(k, divergence, weighted)
    j1, j2 = chunks(block_k, block_k2, student.element_size(), divergence, weighted)
    hard = hard_mode(alpha, tau, has_labels)
    grid = (triton.cdiv(n, block_n),)
    lelp_loss_kernel[grid](
        student, log_targets, weights if weights is not None else student, labels if labels is not None else student,
        grad_scale, loss_rows, hard_rows, grad, n, m, float(jsd_beta), float(tau), float(alpha), int(ignore_index),
        float(subclass_weight), K=k, S=n_subclasses, DIVERGENCE=divergence, HAS_WEIGHTS=weights is not None,
        HAS_LABELS=has_labels, HARD=hard, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_K2=block_k2, J1=j1, J2=j2,
        ROW_AXIS=ROW_AXIS, SUBCLASS_WEIGHTED=weighted,
        num_warps=num_warps,
    )


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
    n = x.numel()
    if n:
        scale_unless_one_kernel[(triton.cdiv(n, SCALE_BLOCK),)](x, scale, n, BLOCK=SCALE_BLOCK, num_warps=4)


# What the AOT test compiles: every flag combination at a row width that is not a power of two and
# at the widest (K = 40, 512), each divergence at three other block shapes (K = 2, 128, 200), plain
# KL (no weights, no labels: the distillation step the cost model of docs/benchmarks.md reads) at
# K = 16 and 128, and every other block shape block_shape gives for K = 2 .. 512 (the flags are
# what changes the code; each dtype's chunking, chunk_constexprs, comes with the dtype compiled).
# With labels, the hard-label term at any τ (HARD = 3: the most live values); KL with it at τ = 1
# (HARD = 1) at the cost model's K, and at τ = 2 at K = 128 (the gates of tests/test_triton_aot.py).
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
    variants = []
    weighted = [(combo, True) for combo in _weighted_combos()]
    for ((k, s), div, has_w, has_y, hard), lam in [(combo, False) for combo in combos] + weighted:
        block_n, block_k, block_k2, num_warps = block_shape(k, div, lam)
        variants.append(dict(num_warps=num_warps, constexprs=dict(
            K=k, S=s, DIVERGENCE=div, HAS_WEIGHTS=has_w, HAS_LABELS=has_y, HARD=hard, BLOCK_N=block_n,
            BLOCK_K=block_k, BLOCK_K2=block_k2, SUBCLASS_WEIGHTED=lam)))
    return variants


# KL at a subclass weight λ ≠ 1 (SUBCLASS_WEIGHTED): at C = 3, S = 4 (two pieces, 8 + 4 columns, a
# class across them) each hard-label mode, with and without teacher weights; the cost model's
# K = 16 (2 x 8) and 128 (8 x 16) and K = 40 (8 x 5), 512 (8 x 64) without labels and at τ = 1, 2;
# then every other block shape the launcher gives it for K = 4 .. 512, with the most live values
# (teacher weights, the hard-label term at any τ) and the widest class loop the shape's K allows
# (C <= limits.MAX_FUSED_WEIGHTED_CLASSES: the loop is unrolled, so C changes the code).
WEIGHTED_COST_SHAPES = [(16, 8), (40, 5), (128, 16), (512, 64)]


def _widest_classes(k: int):
    """(K, S) with the most classes (at most MAX_FUSED_WEIGHTED_CLASSES, S >= 2) for this K, or None."""
    c = max((c for c in range(2, limits.MAX_FUSED_WEIGHTED_CLASSES + 1) if k % c == 0 and k // c >= 2), default=0)
    return (k, k // c) if c else None


def _weighted_combos():
    combos = [((12, 4), 0, has_w, has_y, hard) for has_w, has_y, hard
              in itertools.product((False, True), (True,), (0, 3))]
    combos += [((12, 4), 0, False, has_y, hard) for has_y, hard in ((False, 0), (True, 1), (True, 2))]
    combos += [(shape, 0, False, has_y, hard) for shape in WEIGHTED_COST_SHAPES
               for has_y, hard in ((False, 0), (True, 1), (True, 2))]
    covered = {block_shape(k, 0, True) for (k, _), *_ in combos}
    widest = {}
    for k in range(4, limits.MAX_LOSS_K + 1):
        key, shape = block_shape(k, 0, True), _widest_classes(k)
        classes = widest[key][0] // widest[key][1] if key in widest else 0
        if key not in covered and shape and k // shape[1] >= classes:
            widest[key] = shape
    return combos + [(shape, 0, True, True, 3) for shape in widest.values()]


VARIANTS = _variants()


# The backward's conditional scale, per gradient dtype the folded path writes (ops/loss.py).
SCALE_VARIANTS = [dict(dtype=dtype, num_warps=4, constexprs=dict(BLOCK=SCALE_BLOCK)) for dtype in ("bf16", "fp32")]


def scale_signature(dtype: str) -> dict:
    return {"x_ptr": f"*{dtype}", "scale_ptr": "*fp32", "numel": "i64", "BLOCK": "constexpr"}


def signature(dtype: str, target_dtype: str) -> dict:
    """The kernel's argument types for ahead-of-time compilation (``triton.compile``): the gradient
    in the student's dtype, as ``ops/loss.py`` allocates it on the folded path."""
    return {
        "s_ptr": f"*{dtype}", "t_ptr": f"*{target_dtype}", "w_ptr": "*fp32", "y_ptr": "*i64", "scale_ptr": "*fp32",
        "loss_ptr": "*fp32", "hard_ptr": "*fp32", "grad_ptr": f"*{dtype}", "N": "i32", "M": "i32", "jsd_beta": "fp32",
        "tau": "fp32", "alpha": "fp32", "ignore_index": "i32", "subclass_weight": "fp32",
        **{name: "constexpr" for name in ("K", "S", "DIVERGENCE", "HAS_WEIGHTS", "HAS_LABELS", "HARD", "BLOCK_N",
                                          "BLOCK_K", "BLOCK_K2", "J1", "J2", "ROW_AXIS", "SUBCLASS_WEIGHTED")},
    }
