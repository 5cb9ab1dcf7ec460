"""Triton kernel of the targets op: projection + both segmented log-softmaxes, one pass.

Each program takes ``BLOCK_N`` rows (>= 64) and streams d in ``BLOCK_D`` slices through
tensor-core dots in the input dtype. The fp32 map is split on the host (``split_map``) into a
``hi`` and a ``lo`` part of that dtype, per-column power-of-two scaled so fp16 neither overflows
nor underflows: ``h @ A = (h @ hi + h @ lo) · col_scale`` keeps fp32-like accuracy at bf16/fp16
speed (two chained dots into one fp32 accumulator); fp32 inputs take one ``tf32x3`` dot instead.
The subclass columns are laid out as a padded ``C_PAD x S_PAD`` grid, so the epilogue reshapes
the accumulator to (rows, class, subclass) and takes every class's log-softmax with one
reduction; the teacher head (when no logits are given) is a second, 16-column dot. A program
holds at most 128 columns (``C_BLOCK`` whole classes); wider maps take several programs per row
tile, each with the class log-partition over all C classes.

Numerics are tested on CPU under ``TRITON_INTERPRET=1`` against the fp64 reference; every entry
of ``VARIANTS`` is compiled ahead of time for sm_80/sm_90, its PTX checked and its shared memory,
registers and spills read from the CUBIN (``tests/test_triton_aot.py``).
"""

from __future__ import annotations

import itertools
import os
import weakref
from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import limits
from .limits import padded_grid

NEG_INF = tl.constexpr(float("-inf"))
HEAD_PAD = limits.MAX_HEAD_CLASSES  # the smallest tensor-core N tile: the head dot has 16 columns
# Extra bits carried by the lo part: hi's rounding error is < 2^-(mantissa + 1) of a scaled
# entry (|x| <= 1), so hi · 2^shift stays exact and lo = error · 2^shift stays a normal number.
LO_SHIFT = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 0}
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Config(NamedTuple):
    """One launch configuration; every one the launcher can produce is listed in CONFIGS."""

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
# Rows per program = 64, one wgmma M tile (a full tensor-core tile on sm_80 too). BLOCK_D: 16 at 128
# columns (BLOCK_D = 32: 256 B/thread of spills for fp32 on sm_80; 64: spills for fp32 on both
# archs) with 8 warps (4 spilled 48-144 B for fp32 with given logits under Triton 3.6), 32 up to
# 64 columns. 3 stages keep two copies in flight under each dot. Every entry is compiled for
# sm_80/sm_90 with its shared memory, registers and spills checked (tests/test_triton_aot.py).
CONFIGS = {
    "narrow": [Config(64, 32, 4, 3)],
    "mid": [Config(64, 16, 8, 3)],
}


def class_block(c_pad: int, s_pad: int) -> int:
    """Classes per program: as many whole classes as fit COLUMNS_PER_PROGRAM columns."""
    return max(1, min(c_pad, COLUMNS_PER_PROGRAM // s_pad))


def config_class(columns: int) -> str:
    """Which config list serves a program of ``columns`` accumulator columns (see CONFIGS)."""
    return "narrow" if columns <= 64 else "mid"


@triton.jit
def _accumulate(h, hi_ptr, lo_ptr, d_idx, cols, ld, d_ok, acc, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """acc += h @ hi (+ h @ lo) over one BLOCK_D slice of a (D, ld) map."""
    offs = d_idx[:, None] * ld + cols[None, :]
    hi = tl.load(hi_ptr + offs, mask=d_ok[:, None], other=0.0)
    acc = tl.dot(h, hi, acc, input_precision=PRECISION)
    if SPLIT:
        lo = tl.load(lo_ptr + offs, mask=d_ok[:, None], other=0.0)
        acc = tl.dot(h, lo, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _masked_lse(x, ok, axis: tl.constexpr):
    """logsumexp over ``axis`` of the ``ok`` entries; -inf (never NaN) where none is ok."""
    x = tl.where(ok, x, NEG_INF)
    m = tl.max(x, axis=axis)
    m_safe = tl.where(m == NEG_INF, 0.0, m)
    m_b = tl.expand_dims(m_safe, axis)
    return m_safe + tl.log(tl.sum(tl.where(ok, tl.exp(x - m_b), 0.0), axis=axis))


@triton.jit
def _logits_lse(z_ptr, stride_z, rows64, row_ok, C, inv_tau, BLOCK_N: tl.constexpr):
    """logsumexp_c(z_c / tau) over all C given logits, 64 classes at a time (online rescaling), so a
    program whose class group is narrow never holds all C logits."""
    m = tl.full((BLOCK_N,), NEG_INF, dtype=tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, 64):
        c = c0 + tl.arange(0, 64)
        ok = row_ok[:, None] & (c < C)[None, :]
        z = tl.load(z_ptr + rows64[:, None] * stride_z + c[None, :], mask=ok, other=0.0).to(tl.float32) * inv_tau
        z = tl.where((c < C)[None, :], z, NEG_INF)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    return tl.where(m == NEG_INF, NEG_INF, m + tl.log(total))


@triton.jit
def lelp_targets_kernel(
    h_ptr, stride_h, sub_hi_ptr, sub_lo_ptr, sub_scale_ptr, sub_bias_ptr,
    head_hi_ptr, head_lo_ptr, head_scale_ptr, head_bias_ptr, z_ptr, stride_z, out_ptr, stride_out,
    N, D, C, S, inv_beta, inv_tau,
    HAS_LOGITS: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    C_PAD: tl.constexpr, S_PAD: tl.constexpr, C_BLOCK: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    KP: tl.constexpr = C_PAD * S_PAD  # the map's row length
    KW: tl.constexpr = C_BLOCK * S_PAD  # this program's columns: classes [group * C_BLOCK, +C_BLOCK)
    GROUPS: tl.constexpr = C_PAD // C_BLOCK
    pid = tl.program_id(0)
    group = pid % GROUPS  # a row tile's class groups are neighbours: their h re-reads hit L2
    rows = (pid // GROUPS) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # row offsets can pass 2**31 elements
    k_cols = group * KW + tl.arange(0, KW)
    h_cols = tl.arange(0, 16)

    u = tl.zeros((BLOCK_N, KW), dtype=tl.float32)
    z = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_idx = d0 + tl.arange(0, BLOCK_D)
        d_ok = d_idx < D
        h = tl.load(h_ptr + rows64[:, None] * stride_h + d_idx[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
        u = _accumulate(h, sub_hi_ptr, sub_lo_ptr, d_idx, k_cols, KP, d_ok, u, SPLIT, PRECISION)
        if not HAS_LOGITS:
            z = _accumulate(h, head_hi_ptr, head_lo_ptr, d_idx, h_cols, 16, d_ok, z, SPLIT, PRECISION)

    # Class log-probabilities log p_c = log_softmax(z / tau)_c of this group's classes, (BLOCK_N, C_BLOCK).
    c_idx = group * C_BLOCK + tl.arange(0, C_BLOCK)
    c_ok = (c_idx < C)[None, :]
    if HAS_LOGITS:
        zc = tl.load(z_ptr + rows64[:, None] * stride_z + c_idx[None, :], mask=row_ok[:, None] & c_ok,
                     other=0.0).to(tl.float32) * inv_tau
        lse_c = _logits_lse(z_ptr, stride_z, rows64, row_ok, C, inv_tau, BLOCK_N)
    else:
        z = (z * tl.load(head_scale_ptr + h_cols)[None, :] + tl.load(head_bias_ptr + h_cols)[None, :]) * inv_tau
        lse_c = _masked_lse(z, (h_cols < C)[None, :], 1)
        pick = h_cols[None, None, :] == c_idx[None, :, None]  # (1, C_BLOCK, 16): column c of the head
        zc = tl.sum(tl.where(pick, z[:, None, :], 0.0), axis=2)
    log_p = zc - lse_c[:, None]

    # Subclass log-softmax per class on the (rows, class, subclass) view; log p_c added after it, so
    # a huge u / beta cannot cancel log p_c away.
    u = (u * tl.load(sub_scale_ptr + k_cols)[None, :] + tl.load(sub_bias_ptr + k_cols)[None, :]) * inv_beta
    u3 = tl.reshape(u, (BLOCK_N, C_BLOCK, S_PAD))
    s_idx = tl.arange(0, S_PAD)
    s_ok = (s_idx < S)[None, None, :]
    lse_u = _masked_lse(u3, s_ok, 2)
    out3 = ((u3 - lse_u[:, :, None]) + log_p[:, :, None]).to(out_ptr.dtype.element_ty)
    if EXACT:  # C = C_PAD and S = S_PAD: whole contiguous column ranges, so the stores vectorise
        out_offs = rows64[:, None] * stride_out + k_cols[None, :]
        tl.store(out_ptr + out_offs, tl.reshape(out3, (BLOCK_N, KW)), mask=row_ok[:, None])
    else:
        cols3 = c_idx[None, :, None] * S + s_idx[None, None, :]
        mask3 = row_ok[:, None, None] & c_ok[:, :, None] & s_ok
        tl.store(out_ptr + rows64[:, None, None] * stride_out + cols3, out3, mask=mask3)


_autotuned = {
    name: triton.autotune([triton.Config({"BLOCK_N": c.block_n, "BLOCK_D": c.block_d}, num_warps=c.num_warps,
                                         num_stages=c.num_stages) for c in configs],
                          key=["D", "C_PAD", "S_PAD", "HAS_LOGITS", "SPLIT", "EXACT"])(lelp_targets_kernel)
    for name, configs in CONFIGS.items()
}


class SplitMap(NamedTuple):
    """The fused map laid out for the kernel (see ``split_map``)."""

    sub_hi: torch.Tensor  # (d, C_PAD * S_PAD) input dtype
    sub_lo: torch.Tensor
    sub_scale: torch.Tensor  # (C_PAD * S_PAD,) fp32: undoes the column scaling and 2^shift
    sub_bias: torch.Tensor  # (C_PAD * S_PAD,) fp32
    head_hi: Optional[torch.Tensor]  # (d, 16) or None when logits are given
    head_lo: Optional[torch.Tensor]
    head_scale: Optional[torch.Tensor]
    head_bias: Optional[torch.Tensor]
    c_pad: int
    s_pad: int


def _split_columns(m: torch.Tensor, dtype: torch.dtype):
    """hi, lo (dtype) and an fp32 column scale with m ≈ (hi + lo) * scale, to ~2^-16 of each column's max."""
    m = m.to(torch.float64)
    col_max = m.abs().amax(0)
    exponent = torch.where(col_max > 0, torch.ceil(torch.log2(col_max.clamp_min(1e-300))), torch.zeros_like(col_max))
    shift = LO_SHIFT[dtype]
    unit = torch.exp2(exponent)  # |m / unit| <= 1
    scaled = m / unit
    hi = scaled.to(dtype)
    if dtype == torch.float32:
        return hi, hi, unit.to(torch.float32)
    lo = ((scaled - hi.to(torch.float64)) * 2.0**shift).to(dtype)
    hi = (hi.to(torch.float64) * 2.0**shift).to(dtype)  # exact: a power-of-two scaling
    return hi.contiguous(), lo.contiguous(), (unit * 2.0**-shift).to(torch.float32)


def split_map(weight: torch.Tensor, bias: torch.Tensor, num_classes: int, n_subclasses: int, dtype: torch.dtype,
              with_head: bool) -> SplitMap:
    """Lays the fused ``[A | Wᵀ]``, ``[e | b]`` out for the kernel: padded grid, hi/lo parts of ``dtype``."""
    d, device = weight.shape[0], weight.device
    c_pad, s_pad = padded_grid(num_classes, n_subclasses)
    k = num_classes * n_subclasses
    grid_cols = (torch.arange(num_classes, device=device)[:, None] * s_pad
                 + torch.arange(n_subclasses, device=device)[None, :]).flatten()
    sub = torch.zeros(d, c_pad * s_pad, dtype=torch.float64, device=device)
    sub[:, grid_cols] = weight[:, :k].to(torch.float64)
    sub_bias = torch.zeros(c_pad * s_pad, dtype=torch.float32, device=device)
    sub_bias[grid_cols] = bias[:k].to(torch.float32)
    sub_hi, sub_lo, sub_scale = _split_columns(sub, dtype)
    head = (None,) * 4
    if with_head:
        w = torch.zeros(d, HEAD_PAD, dtype=torch.float64, device=device)
        w[:, :num_classes] = weight[:, k:].to(torch.float64)
        b = torch.zeros(HEAD_PAD, dtype=torch.float32, device=device)
        b[:num_classes] = bias[k:].to(torch.float32)
        head = (*_split_columns(w, dtype), b)
    return SplitMap(sub_hi, sub_lo, sub_scale, sub_bias, *head, c_pad, s_pad)


# Split maps by the weight tensor they were made from, held weakly (a refit's new tensors miss and
# an entry goes with its weight); the version counters catch in-place changes. Splitting costs about
# 55 small fp64 kernels (~0.1 ms on a GPU), per call and teacher before the cache (issue 21 item 7).
# Keyed by id() with a weak reference that removes the entry (a WeakKeyDictionary would compare
# tensors with ==, which is elementwise).
_SPLITS: dict = {}


def _splits_of(weight: torch.Tensor) -> dict:
    entry = _SPLITS.get(id(weight))
    if entry is None or entry[0]() is not weight:
        key = id(weight)
        entry = (weakref.ref(weight, lambda _, key=key: _SPLITS.pop(key, None)), {})
        _SPLITS[key] = entry
    return entry[1]


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors have no version counter: not cached
        return None


def cached_split_map(weight: torch.Tensor, bias: torch.Tensor, num_classes: int, n_subclasses: int,
                     dtype: torch.dtype, with_head: bool, device: torch.device) -> SplitMap:
    """``split_map`` of the fp32 ``weight``/``bias`` on ``device``, computed once per (weight, bias,
    their versions, shape, dtype, device)."""
    versions = (_version(weight), _version(bias))
    if None in versions:
        return split_map(weight.to(device, torch.float32), bias.to(device, torch.float32), num_classes,
                         n_subclasses, dtype, with_head)
    key = (*versions, id(bias), num_classes, n_subclasses, dtype, with_head, str(device))
    per_weight = _splits_of(weight)
    hit = per_weight.get(key)
    if hit is not None and hit[0]() is bias:
        return hit[1]
    split = split_map(weight.to(device, torch.float32), bias.to(device, torch.float32), num_classes, n_subclasses,
                      dtype, with_head)
    per_weight[key] = (weakref.ref(bias), split)
    return split


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def targets_triton(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out):
    """Launches the kernel; ``weight``/``bias`` are the fused ``[A | Wᵀ]``, ``[e | b]`` (any float dtype
    and device: their split is made on the embeddings' device once, see ``cached_split_map``)."""
    n, d = embeddings.shape
    why = limits.targets_unsupported(num_classes, n_subclasses, with_head=teacher_logits is None)
    if why:
        raise ValueError(f"the triton targets kernel cannot run: {why}")
    split = cached_split_map(weight, bias, num_classes, n_subclasses, embeddings.dtype, teacher_logits is None,
                             embeddings.device)
    c_block = class_block(split.c_pad, split.s_pad)
    groups = split.c_pad // c_block
    z = teacher_logits if teacher_logits is not None else embeddings
    head = [split.head_hi, split.head_lo, split.head_scale, split.head_bias]
    head = [t if t is not None else split.sub_bias for t in head]  # unused pointers when logits are given
    args = (embeddings, embeddings.stride(0), split.sub_hi, split.sub_lo, split.sub_scale, split.sub_bias, *head,
            z, z.stride(0), out, out.stride(0), n, d, num_classes, n_subclasses, 1.0 / beta, 1.0 / tau)
    constexprs = dict(HAS_LOGITS=teacher_logits is not None, SPLIT=embeddings.dtype != torch.float32,
                      PRECISION="tf32x3" if embeddings.dtype == torch.float32 else "ieee",
                      C_PAD=split.c_pad, S_PAD=split.s_pad, C_BLOCK=c_block,
                      EXACT=(split.c_pad, split.s_pad) == (num_classes, n_subclasses))
    name = config_class(c_block * split.s_pad)
    if _interpreting():  # the autotuner times configs on a GPU; the interpreter takes the first one
        cfg = CONFIGS[name][0]
        grid = (triton.cdiv(n, cfg.block_n) * groups,)
        lelp_targets_kernel[grid](*args, **constexprs, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
    else:
        _autotuned[name][lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * groups,)](*args, **constexprs)
    return out


# The padded grids each config list is compiled at: its widest program (registers, shared memory
# and spills grow with the columns) with a head (C <= 16), and for "mid" also one of several class
# groups with given logits (512 classes: the chunked class logsumexp, group offsets).
VARIANT_GRIDS = {"narrow": [(4, 16)], "mid": [(8, 16), (512, 1)]}


def _variants() -> List[dict]:
    """Every constexpr combination ``targets_triton`` can launch, at the grids of VARIANT_GRIDS."""
    variants = []
    for name, configs in CONFIGS.items():
        for (c_pad, s_pad), cfg in itertools.product(VARIANT_GRIDS[name], configs):
            heads = (False, True) if c_pad <= HEAD_PAD else (True,)
            for dtype, has_logits, exact in itertools.product(_TL_DTYPES, heads, (False, True)):
                variants.append(dict(
                    dtype=_TL_DTYPES[dtype], config=cfg,
                    constexprs=dict(HAS_LOGITS=has_logits, SPLIT=dtype != torch.float32,
                                    PRECISION="tf32x3" if dtype == torch.float32 else "ieee",
                                    C_PAD=c_pad, S_PAD=s_pad, C_BLOCK=class_block(c_pad, s_pad), EXACT=exact,
                                    BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)))
    return variants


VARIANTS = _variants()


def signature(dtype: str, out_dtype: str = "fp32") -> dict:
    """The kernel's argument types for ahead-of-time compilation (``triton.compile``)."""
    return {
        "h_ptr": f"*{dtype}", "stride_h": "i64", "sub_hi_ptr": f"*{dtype}", "sub_lo_ptr": f"*{dtype}",
        "sub_scale_ptr": "*fp32", "sub_bias_ptr": "*fp32", "head_hi_ptr": f"*{dtype}", "head_lo_ptr": f"*{dtype}",
        "head_scale_ptr": "*fp32", "head_bias_ptr": "*fp32", "z_ptr": f"*{dtype}", "stride_z": "i64",
        "out_ptr": f"*{out_dtype}", "stride_out": "i64", "N": "i32", "D": "i32", "C": "i32", "S": "i32",
        "inv_beta": "fp32", "inv_tau": "fp32",
        **{name: "constexpr" for name in ("HAS_LOGITS", "SPLIT", "PRECISION", "C_PAD", "S_PAD", "C_BLOCK",
                                          "EXACT", "BLOCK_N", "BLOCK_D")},
    }


def available() -> bool:
    """Triton kernels run on CUDA devices, or anywhere under TRITON_INTERPRET=1."""
    return torch.cuda.is_available() or _interpreting()
