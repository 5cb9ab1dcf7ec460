"""Triton kernel of the targets op: projection + both segmented log-softmaxes, one pass.

Each program takes ``BLOCK_N`` rows: it accumulates ``h @ A`` and ``h @ Wᵀ`` over d in
``BLOCK_D`` slices with ``tl.dot`` (fp32 accumulation), then computes the class log-softmax and,
class by class with masks over that class's S columns, the subclass log-softmax. C and S need
not be powers of two. Tested on CPU under ``TRITON_INTERPRET=1`` against the fp64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_lse(x, col_class, c, valid):
    """Per-row logsumexp of the columns of class ``c`` (x already scaled)."""
    sel = (col_class == c) & valid
    m = tl.max(tl.where(sel, x, float("-inf")), axis=1)
    e = tl.where(sel, tl.exp(x - m[:, None]), 0.0)
    return m + tl.log(tl.sum(e, axis=1))


@triton.jit
def lelp_targets_kernel(
    h_ptr, stride_h, a_ptr, e_ptr, w_ptr, b_ptr, z_ptr, stride_z, out_ptr, stride_out,
    N, D, C, S, inv_beta, inv_tau,
    HAS_LOGITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # row offsets can pass 2**31 elements
    k_cols = tl.arange(0, BLOCK_K)
    c_cols = tl.arange(0, BLOCK_C)
    K = C * S
    k_ok = k_cols < K
    c_ok = c_cols < C

    u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    z = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_idx = d0 + tl.arange(0, BLOCK_D)
        d_ok = d_idx < D
        h = tl.load(h_ptr + rows64[:, None] * stride_h + d_idx[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        a = tl.load(a_ptr + d_idx[:, None] * K + k_cols[None, :], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        u += tl.dot(h, a, input_precision="ieee")
        if not HAS_LOGITS:
            w = tl.load(w_ptr + d_idx[:, None] * C + c_cols[None, :], mask=d_ok[:, None] & c_ok[None, :], other=0.0)
            z += tl.dot(h, w, input_precision="ieee")
    u += tl.load(e_ptr + k_cols, mask=k_ok, other=0.0)[None, :]
    if HAS_LOGITS:
        z = tl.load(z_ptr + rows64[:, None] * stride_z + c_cols[None, :], mask=row_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
    else:
        z += tl.load(b_ptr + c_cols, mask=c_ok, other=0.0)[None, :]

    z = z * inv_tau
    z_max = tl.max(tl.where(c_ok[None, :], z, float("-inf")), axis=1)
    lse_z = z_max + tl.log(tl.sum(tl.where(c_ok[None, :], tl.exp(z - z_max[:, None]), 0.0), axis=1))

    u = u * inv_beta
    col_class = k_cols // S
    out = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for c in range(0, C):
        lse_u = _segment_lse(u, col_class[None, :], c, k_ok[None, :])
        z_c = tl.sum(tl.where(c_cols[None, :] == c, z, 0.0), axis=1)
        val = (z_c - lse_z - lse_u)[:, None] + u
        out = tl.where(col_class[None, :] == c, val, out)
    tl.store(out_ptr + rows64[:, None] * stride_out + k_cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


def targets_triton(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out):
    """Launches the kernel; ``weight``/``bias`` are the fused ``[A | Wᵀ]``, ``[e | b]`` (fp32)."""
    n, d = embeddings.shape
    k = num_classes * n_subclasses
    a = weight[:, :k].contiguous()
    e = bias[:k].contiguous()
    w = weight[:, k:].contiguous() if teacher_logits is None else a  # unused when logits are given
    b = bias[k:].contiguous() if teacher_logits is None else e
    z = teacher_logits if teacher_logits is not None else embeddings
    block_k = max(16, triton.next_power_of_2(k))
    block_c = max(16, triton.next_power_of_2(num_classes))
    block_n = 16 if block_k <= 128 else 8
    grid = (triton.cdiv(n, block_n),)
    lelp_targets_kernel[grid](
        embeddings, embeddings.stride(0), a, e, w, b, z, z.stride(0), out, out.stride(0),
        n, d, num_classes, n_subclasses, 1.0 / beta, 1.0 / tau,
        HAS_LOGITS=teacher_logits is not None, BLOCK_N=block_n, BLOCK_D=32, BLOCK_K=block_k, BLOCK_C=block_c,
    )
    return out


def available() -> bool:
    """Triton kernels run on CUDA devices, or anywhere under TRITON_INTERPRET=1."""
    import os

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
