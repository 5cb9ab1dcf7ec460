"""Triton kernel of the fused distillation loss: per-row loss and dL/ds in one pass.

Same math as ``csrc/include/lelp/loss_math.h`` (see its header comment): every divergence from
log-probabilities, fp32 throughout. Precomputed targets, optionally M teachers mixed by per-row
weights in the kernel. Tested on CPU under ``TRITON_INTERPRET=1`` against the fp64 reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = 0.6931471805599453


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return tl.where(m == float("-inf"), float("-inf"), m_safe + tl.log(tl.exp(a - m_safe) + tl.exp(b - m_safe)))


@triton.jit
def lelp_loss_kernel(
    s_ptr, stride_s, t_ptr, stride_t, w_ptr, y_ptr, loss_ptr, grad_ptr,
    N, C, S, M, tau, alpha, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_LABELS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    K = C * S
    col_ok = cols < K
    ok = row_ok[:, None] & col_ok[None, :]
    neg_inf = float("-inf")

    s = tl.load(s_ptr + rows64[:, None] * stride_s + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_WEIGHTS:
        log_t = tl.full((BLOCK_N, BLOCK_K), neg_inf, dtype=tl.float32)
        for m in range(0, M):
            w = tl.load(w_ptr + rows64 * M + m, mask=row_ok, other=0.0)
            lt = tl.load(t_ptr + rows64[:, None] * stride_t + m * K + cols[None, :], mask=ok, other=0.0)
            lw = tl.where(w > 0.0, tl.log(tl.where(w > 0.0, w, 1.0)), neg_inf)
            cand = tl.where((w > 0.0)[:, None], lw[:, None] + lt.to(tl.float32), neg_inf)
            log_t = _logaddexp(log_t, cand)
    else:
        log_t = tl.load(t_ptr + rows64[:, None] * stride_t + cols[None, :], mask=ok, other=0.0).to(tl.float32)

    inv_tau = 1.0 / tau
    x = tl.where(col_ok[None, :], s * inv_tau, neg_inf)
    x_max = tl.max(x, axis=1)
    lse = x_max + tl.log(tl.sum(tl.exp(x - x_max[:, None]), axis=1))
    log_q = tl.where(col_ok[None, :], s * inv_tau - lse[:, None], 0.0)
    q = tl.where(col_ok[None, :], tl.exp(log_q), 0.0)
    t = tl.where(col_ok[None, :], tl.exp(log_t), 0.0)
    log_t = tl.where(col_ok[None, :], log_t, 0.0)

    if DIVERGENCE == 0:  # KL(t || q)
        d = tl.sum(tl.where(t > 0.0, t * (log_t - log_q), 0.0), axis=1)
        grad = tau * (q - t)
    else:
        if DIVERGENCE == 1:  # KL(q || t)
            r = log_q - log_t
            d = tl.sum(tl.where(q > 0.0, q * r, 0.0), axis=1)
            a = tl.where(q > 0.0, r, 0.0)
        elif DIVERGENCE == 2:  # JS
            log_m = _logaddexp(log_t, log_q) - LN2
            d = 0.5 * tl.sum(tl.where(t > 0.0, t * (log_t - log_m), 0.0) + tl.where(q > 0.0, q * (log_q - log_m), 0.0),
                             axis=1)
            a = tl.where(q > 0.0, 0.5 * (log_q - log_m), 0.0)
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
            sx = tl.where(col_ok[None, :], s, neg_inf)
            s_max = tl.max(sx, axis=1)
            lse_all = s_max + tl.log(tl.sum(tl.exp(sx - s_max[:, None]), axis=1))
            in_y = (cols[None, :] // S) == y[:, None]
            sy = tl.where(in_y & col_ok[None, :], s, neg_inf)
            sy_max = tl.max(sy, axis=1)
            sy_max = tl.where(keep, sy_max, 0.0)
            p_y = sy_max + tl.log(tl.sum(tl.where(in_y & col_ok[None, :], tl.exp(s - sy_max[:, None]), 0.0), axis=1))
            p_y = tl.where(keep, p_y, 0.0)
            loss += alpha * (lse_all - p_y)
            g_ce = tl.exp(sx - lse_all[:, None]) - tl.where(in_y, tl.exp(s - p_y[:, None]), 0.0)
            grad += alpha * tl.where(col_ok[None, :], g_ce, 0.0)
        loss = tl.where(keep, loss, 0.0)
        grad = tl.where(keep[:, None], grad, 0.0)

    tl.store(loss_ptr + rows64, loss, mask=row_ok)
    tl.store(grad_ptr + rows64[:, None] * K + cols[None, :], grad, mask=ok)


def loss_triton(student, log_targets, weights, labels, num_classes, n_subclasses, divergence, tau, alpha,
                ignore_index, loss_rows, grad):
    """Launches the kernel on contiguous-row inputs; fills ``loss_rows`` (N,) and ``grad`` (N, K)."""
    n, k = student.shape
    m = 1 if log_targets.ndim == 2 else log_targets.shape[1]
    block_k = max(16, triton.next_power_of_2(k))
    block_n = max(1, min(64, 4096 // block_k))
    grid = (triton.cdiv(n, block_n),)
    lelp_loss_kernel[grid](
        student, student.stride(0), log_targets, log_targets.stride(0), weights if weights is not None else student,
        labels if labels is not None else student, loss_rows, grad,
        n, num_classes, n_subclasses, m, float(tau), float(alpha), int(ignore_index),
        DIVERGENCE=divergence, HAS_WEIGHTS=weights is not None, HAS_LABELS=labels is not None,
        BLOCK_N=block_n, BLOCK_K=block_k,
    )
