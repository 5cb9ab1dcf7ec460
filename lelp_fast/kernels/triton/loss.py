"""Triton kernel of the fused distillation loss: per-row loss and dL/ds in one pass.

Same math as ``csrc/include/lelp/loss_math.h`` (see its header comment): every divergence from
log-probabilities, fp32 throughout. Precomputed targets, optionally M teachers mixed by per-row
weights in the kernel; online targets are computed first by the targets kernel into an fp32
buffer (``ops/loss.py``), so the loss reads the student once and writes the gradient once.

K = C·S and S are compile-time constants: the rows are contiguous (stride K), so the compiler
sees the row alignment and vectorises the loads, and ``col // S`` is a multiply, not a division.
A NaN anywhere in a row gives a NaN loss and gradient for that row (never a finite one).
Tested on CPU under ``TRITON_INTERPRET=1`` against the fp64 reference; ``VARIANTS`` is compiled
ahead of time for sm_80/sm_90 (``tests/test_triton_aot.py``).
"""

from __future__ import annotations

import itertools
from typing import List

import triton
import triton.language as tl

from . import limits

NEG_INF = tl.constexpr(float("-inf"))
# An 8 KB fp32 tile per array: 16 values per thread at 4 warps. 4096 (32 per thread) spilled at
# K = 40 (JS with weights and labels, fp32: 32 B stack) and K = 512 (TVD: 24 B under Triton 3.9;
# about 11 KB under 3.6, as read from the CUBINs by tests/test_triton_aot.py).
ELEMENTS_PER_PROGRAM = 2048
# Rows per program at most: short rows (K = 2) at 2048 rows made each per-row vector 16 values per
# thread, and the dozen of them spilled (8 B stack at K = 2).
MAX_ROWS_PER_PROGRAM = 256


def block_shape(k: int):
    """(BLOCK_N, BLOCK_K, num_warps): the whole row in registers (BLOCK_K = next_pow2(K)), rows
    batched so a program holds ELEMENTS_PER_PROGRAM elements (at most MAX_ROWS_PER_PROGRAM rows);
    4 warps, 8 at K > 256 (4 spilled 8 B at K = 512 under Triton 3.6, where ptxas kept to 64
    registers); no spills for the ~8 live arrays, checked in the CUBIN by the AOT test."""
    block_k = max(2, triton.next_power_of_2(k))
    return min(ELEMENTS_PER_PROGRAM // block_k, MAX_ROWS_PER_PROGRAM), block_k, 8 if block_k >= 512 else 4


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)  # a NaN teacher weight stays NaN
    m_safe = tl.where(m == NEG_INF, 0.0, m)
    return tl.where(m == NEG_INF, NEG_INF, m_safe + tl.log(tl.exp(a - m_safe) + tl.exp(b - m_safe)))


@triton.jit
def _xlogx_ratio(p, log_p, log_x):
    """p (log p - log x) with 0 log 0 = 0; a NaN p stays NaN."""
    return tl.where(p == 0.0, 0.0, p * (log_p - log_x))


@triton.jit
def _mixed_log_targets(t_ptr, w_ptr, rows64, row_ok, cols, ok, M, K: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """log Σ_m w_m t_m per element; a NaN or negative weight gives NaN, a zero weight drops its teacher."""
    log_t = tl.full((BLOCK_N, BLOCK_K), NEG_INF, dtype=tl.float32)
    for m in range(0, M):
        w = tl.load(w_ptr + rows64 * M + m, mask=row_ok, other=0.0)
        lt = tl.load(t_ptr + rows64[:, None] * (M * K) + m * K + cols[None, :], mask=ok, other=0.0)
        lw = tl.where(w == 0.0, NEG_INF, tl.log(w))  # log of a negative or NaN weight is NaN
        log_t = _logaddexp(log_t, lw[:, None] + lt.to(tl.float32))
    return log_t


@triton.jit
def _hard_label_term(s, y, keep, cols, col_ok, alpha, S: tl.constexpr):
    """alpha · CE(y, logsumexp-pool(s)) per row and its gradient."""
    sx = tl.where(col_ok[None, :], s, NEG_INF)
    s_max = tl.max(sx, axis=1)
    lse_all = s_max + tl.log(tl.sum(tl.exp(sx - s_max[:, None]), axis=1))
    in_y = ((cols[None, :] // S) == y[:, None]) & col_ok[None, :]
    sy_max = tl.where(keep, tl.max(tl.where(in_y, s, NEG_INF), axis=1), 0.0)
    p_y = sy_max + tl.log(tl.sum(tl.where(in_y, tl.exp(s - sy_max[:, None]), 0.0), axis=1))
    p_y = tl.where(keep, p_y, 0.0)
    g = tl.exp(sx - lse_all[:, None]) - tl.where(in_y, tl.exp(s - p_y[:, None]), 0.0)
    return alpha * (lse_all - p_y), alpha * tl.where(col_ok[None, :], g, 0.0)


@triton.jit
def lelp_loss_kernel(
    s_ptr, t_ptr, w_ptr, y_ptr, loss_ptr, hard_ptr, grad_ptr,
    N, M, jsd_beta, tau, alpha, ignore_index,
    K: tl.constexpr, S: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    HAS_LABELS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows64[:, None] * K + cols[None, :]

    s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_WEIGHTS:
        log_t = _mixed_log_targets(t_ptr, w_ptr, rows64, row_ok, cols, ok, M, K, BLOCK_N, BLOCK_K)
    else:
        log_t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32)

    inv_tau = 1.0 / tau
    x = tl.where(col_ok[None, :], s * inv_tau, NEG_INF)
    x_max = tl.max(x, axis=1)
    lse = x_max + tl.log(tl.sum(tl.exp(x - x_max[:, None]), axis=1))
    log_q = tl.where(col_ok[None, :], s * inv_tau - lse[:, None], 0.0)
    q = tl.where(col_ok[None, :], tl.exp(log_q), 0.0)
    t = tl.where(col_ok[None, :], tl.exp(log_t), 0.0)
    log_t = tl.where(col_ok[None, :], log_t, 0.0)

    if DIVERGENCE == 0:  # KL(t || q); q Σt - t, not q - t: low-precision targets need not sum to 1
        d = tl.sum(_xlogx_ratio(t, log_t, log_q), axis=1)
        grad = tau * (q * tl.sum(t, axis=1)[:, None] - t)
    elif DIVERGENCE == 4:  # MSE of the centred logits s/tau and log t
        e = (log_q - tl.sum(log_q, axis=1)[:, None] / K) - (log_t - tl.sum(log_t, axis=1)[:, None] / K)
        e = tl.where(col_ok[None, :], e, 0.0)
        d = tl.sum(e * e, axis=1) / K
        grad = (2.0 * tau / K) * e
    else:
        if DIVERGENCE == 1:  # KL(q || t)
            r = log_q - log_t
            d = tl.sum(_xlogx_ratio(q, log_q, log_t), axis=1)
            a = tl.where(q == 0.0, 0.0, r)
        elif DIVERGENCE == 2:  # generalised JSD: m = b t + (1 - b) q (b = 1/2: JS)
            log_m = _logaddexp(log_t + tl.log(jsd_beta), log_q + tl.log(1.0 - jsd_beta))
            d = tl.sum(jsd_beta * _xlogx_ratio(t, log_t, log_m) + (1.0 - jsd_beta) * _xlogx_ratio(q, log_q, log_m),
                       axis=1)
            a = tl.where(q == 0.0, 0.0, (1.0 - jsd_beta) * (log_q - log_m))
        else:  # TVD
            d = 0.5 * tl.sum(tl.abs(t - q), axis=1)
            a = tl.where(q > t, 0.5, tl.where(q < t, -0.5, 0.0))
        a = tl.where(col_ok[None, :], a, 0.0)
        qa = tl.sum(q * a, axis=1)
        grad = tau * q * (a - qa[:, None])
    loss = tau * tau * d

    if HAS_LABELS:
        y = tl.load(y_ptr + rows64, mask=row_ok, other=ignore_index)
        keep = y != ignore_index
        if alpha != 0.0:
            ce, g_ce = _hard_label_term(s, y, keep, cols, col_ok, alpha, S)
            loss += ce
            grad += g_ce
            tl.store(hard_ptr + rows64, tl.where(keep, ce, 0.0), mask=row_ok)
        loss = tl.where(keep, loss, 0.0)
        grad = tl.where(keep[:, None], grad, 0.0)

    tl.store(loss_ptr + rows64, loss, mask=row_ok)
    tl.store(grad_ptr + offs, grad, mask=ok)


def loss_triton(student, log_targets, weights, labels, num_classes, n_subclasses, divergence, jsd_beta, tau, alpha,
                ignore_index, loss_rows, hard_rows, grad):
    """Launches the kernel on contiguous inputs; fills ``loss_rows`` (N,), ``grad`` (N, K) and, when the
    hard-label term is on, its part ``hard_rows`` (N,) (fp32)."""
    n, k = student.shape
    why = limits.loss_unsupported(num_classes, n_subclasses)
    if why:
        raise ValueError(f"the triton loss kernel cannot run: {why}")
    m = 1 if log_targets.ndim == 2 else log_targets.shape[1]
    block_n, block_k, num_warps = block_shape(k)
    grid = (triton.cdiv(n, block_n),)
    lelp_loss_kernel[grid](
        student, log_targets, weights if weights is not None else student, labels if labels is not None else student,
        loss_rows, hard_rows, grad, n, m, float(jsd_beta), float(tau), float(alpha), int(ignore_index),
        K=k, S=n_subclasses, DIVERGENCE=divergence, HAS_WEIGHTS=weights is not None, HAS_LABELS=labels is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )


# What the AOT test compiles: every flag combination at a row width that is not a power of two and
# at the widest (K = 40, 512), each divergence at three other block shapes (K = 2, 128, 200), KL and
# JS (the most live arrays) at the remaining ones (block_shape gives every K its next power of two;
# the flags are what changes the code), and plain KL (no weights, no labels: the distillation step
# the cost model of docs/benchmarks.md reads) at K = 16 and 128.
FULL_SHAPES = [(40, 20), (512, 32)]
DIVERGENCE_SHAPES = [(2, 1), (128, 16), (200, 8)]
BLOCK_SHAPES = [(3, 3), (8, 4), (16, 8), (24, 8)]
COST_SHAPES = [(16, 8), (128, 16)]


def _variants() -> List[dict]:
    combos = [(shape, div, has_w, has_y) for shape, div, has_w, has_y
              in itertools.product(FULL_SHAPES, range(5), (False, True), (False, True))]
    combos += [(shape, div, False, True) for shape, div in itertools.product(DIVERGENCE_SHAPES, range(5))]
    combos += [(shape, div, False, True) for shape, div in itertools.product(BLOCK_SHAPES, (0, 2))]
    combos += [(shape, 0, False, False) for shape in COST_SHAPES]
    variants = []
    for (k, s), div, has_w, has_y in combos:
        block_n, block_k, num_warps = block_shape(k)
        variants.append(dict(num_warps=num_warps, constexprs=dict(
            K=k, S=s, DIVERGENCE=div, HAS_WEIGHTS=has_w, HAS_LABELS=has_y, BLOCK_N=block_n, BLOCK_K=block_k)))
    return variants


VARIANTS = _variants()


def signature(dtype: str, target_dtype: str) -> dict:
    """The kernel's argument types for ahead-of-time compilation (``triton.compile``)."""
    return {
        "s_ptr": f"*{dtype}", "t_ptr": f"*{target_dtype}", "w_ptr": "*fp32", "y_ptr": "*i64", "loss_ptr": "*fp32",
        "hard_ptr": "*fp32", "grad_ptr": "*fp32", "N": "i32", "M": "i32", "jsd_beta": "fp32", "tau": "fp32",
        "alpha": "fp32", "ignore_index": "i32",
        **{name: "constexpr" for name in ("K", "S", "DIVERGENCE", "HAS_WEIGHTS", "HAS_LABELS", "BLOCK_N", "BLOCK_K")},
    }
