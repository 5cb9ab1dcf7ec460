"""The targets op: embeddings -> log LELP targets (N x K), one pass, no N x d intermediates.

``weight`` is the fused ``[A | Wᵀ]`` (d x J, fp32) and ``bias`` is ``[e | b]``: one skinny
GEMM gives the subclass coordinates and, when no teacher logits are passed, the class logits.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._derived import derived
from .._checks import check_finite, check_float, check_matrix, check_positive
from ..kernels.triton import limits as triton_limits
from . import _dispatch

_DTYPE_CODES = _dispatch.DTYPE_CODES


def _targets_torch(emb, weight, bias, num_classes, n_subclasses, logits, beta, tau, out_dtype, out=None):
    """The targets by torch ops, into ``out`` when given (else a new tensor of ``out_dtype``)."""
    compute = torch.float64 if emb.dtype == torch.float64 else torch.float32
    if _vanilla_kd(n_subclasses, logits):  # the subclass term is 0: the embeddings are not read
        if out is None:
            out = torch.empty(logits.shape, dtype=out_dtype, device=logits.device)
        return _kd_targets_torch(logits, tau, torch.float64 if logits.dtype == torch.float64 else compute, out)
    k = num_classes * n_subclasses
    result = projected_log_targets(emb, weight, bias, k, logits, n_subclasses, beta, tau, compute).to(out_dtype)
    return result if out is None else out.copy_(result)


def projected_log_targets(emb, weight, bias, k, logits, n_subclasses, beta, tau, compute):
    """The (N, k) log-targets of ``h @ W + b`` (k subclass logits, then the class logits when
    ``logits`` is None) by torch ops in ``compute``: the torch backend's, offline and online."""
    proj = emb.to(compute) @ weight.to(compute) + bias.to(compute)
    z = proj[:, k:] if logits is None else logits.to(compute)
    return reference.log_targets(proj[:, :k], z, n_subclasses, beta, tau)  # each shifted by its max first


def _kd_targets_torch(logits, tau, compute, out):
    """Vanilla KD's ``log_softmax(logits / tau)`` into ``out`` in ``compute`` precision: one copy of
    the logits, scaled in place, and the log-softmax written straight into ``out`` where it has the
    compute dtype (262,144 x 300 bf16 logits on 2 cores: 201 ms, against 347 ms for the plain formula
    and a copy into ``out``; 2026-12-04). Differentiable in the logits, as the formula (an ``out=``
    op is not: then the formula and a copy)."""
    x = logits.to(compute, copy=True)
    if tau != 1.0:
        x.div_(tau)
    if out.dtype == compute and not (torch.is_grad_enabled() and logits.requires_grad):
        return torch.log_softmax(x, dim=1, out=out)
    return out.copy_(torch.log_softmax(x, dim=1))


def _vanilla_kd(n_subclasses: int, teacher_logits: Optional[torch.Tensor]) -> bool:
    """One subclass per class with given logits: ``log_softmax(z / τ)``, the same on every backend
    (``limits.vanilla_kd``); the Triton backend has its own kernel, the others take torch's."""
    return triton_limits.vanilla_kd(n_subclasses, teacher_logits is not None)


# The CUDA tensor-core tile (csrc/include/lelp/block_targets.h): the widest padded map it takes
# (tile::kMaxTileCols) and the padding of its split map (tile::split_rows / split_cols);
# tests/test_cuda_emulated.py holds these against the C++.
CUDA_TILE_MAX_COLS = 256
CUDA_SPLIT_ROWS = 32  # the map rows of one step (tile::kStepK)
CUDA_SPLIT_COLS = 16  # one MMA fragment


def cuda_tile_takes(j: int, num_classes: int, n_subclasses: int) -> bool:
    """Whether targets_cuda runs the tensor-core tile (else the row kernel) for a map of ``j`` columns."""
    pad = -(-j // CUDA_SPLIT_COLS) * CUDA_SPLIT_COLS
    return pad <= CUDA_TILE_MAX_COLS and num_classes * n_subclasses + num_classes <= CUDA_TILE_MAX_COLS


def cuda_tile_split(weight: torch.Tensor, dtype: torch.dtype, device: torch.device):
    """The fused map as the CUDA tile reads it: hi + lo parts (fp32 ≈ hi + lo) of the embeddings'
    ``dtype`` (bf16 for fp32 embeddings, which the tile splits into bf16 parts too), zero-padded to
    whole steps and fragments."""
    w = weight.detach().to(device=device, dtype=torch.float32)
    part = torch.bfloat16 if dtype == torch.float32 else dtype
    hi = w.to(part)
    lo = (w - hi.to(torch.float32)).to(part)
    d, j = w.shape
    rows, cols = -(-d // CUDA_SPLIT_ROWS) * CUDA_SPLIT_ROWS, -(-j // CUDA_SPLIT_COLS) * CUDA_SPLIT_COLS
    parts = torch.zeros(2, rows, cols, dtype=part, device=device)
    parts[0, :d, :j], parts[1, :d, :j] = hi, lo
    return parts[0], parts[1]


def cached_cuda_tile_split(weight: torch.Tensor, dtype: torch.dtype, device: torch.device):
    """``cuda_tile_split``, made once per (weight, its version, dtype, device). Before the cache the
    tile split the map on every step of every tile (issue 21 items 7 and 10)."""
    return derived(weight, ("cuda_tile", dtype, str(device)), lambda: cuda_tile_split(weight, dtype, device))


def _targets_compiled(emb, weight, bias, num_classes, n_subclasses, logits, beta, tau, out, device, check_inputs):
    if emb.shape[0] == 0:
        return out
    split = None
    if device == "cuda" and cuda_tile_takes(weight.shape[1], num_classes, n_subclasses):
        split = cached_cuda_tile_split(weight, emb.dtype, emb.device)  # the tile reads no other map
    else:
        weight = weight.to(device=emb.device, dtype=torch.float32).contiguous()
    bias = bias.to(device=emb.device, dtype=torch.float32).contiguous()
    args = [
        emb.data_ptr(), _DTYPE_CODES[emb.dtype], emb.stride(0), emb.shape[0], emb.shape[1],
        0 if split is not None else weight.data_ptr(), bias.data_ptr(), weight.shape[1],
        0 if logits is None else logits.data_ptr(),
        0 if logits is None else _DTYPE_CODES[logits.dtype],
        0 if logits is None else logits.stride(0),
        num_classes, n_subclasses, float(beta), float(tau),
        out.data_ptr(), _DTYPE_CODES[out.dtype], out.stride(0),
    ]
    ext = _dispatch.extension()
    if device == "cuda":
        stream = torch.cuda.current_stream(emb.device).cuda_stream if emb.is_cuda else 0  # 0: the tests' host run
        ext.targets_cuda(*args, stream, *((split[0].data_ptr(), split[1].data_ptr()) if split else (0, 0)))
        _check_targets(out, check_inputs, logits, n_subclasses)  # nothing on a GPU tensor; the tests' host run checks
        return out
    # On CPU the kernel flags rows with a non-finite projection: the NaN/Inf check costs no extra read.
    flags = torch.zeros(emb.shape[0], dtype=torch.uint8) if check_inputs else None
    ext.targets_cpu(*args, 0 if flags is None else flags.data_ptr())
    if flags is not None and bool(flags.any()):
        _check_flagged_rows(torch.nonzero(flags).flatten(), emb, logits, out)
    return out


def _check_flagged_rows(suspects, emb, logits, out) -> None:
    """The flag is a row sum of the projections and logits, which finite values can overflow too:
    with finite inputs, a flagged row is an error only where its targets hold NaN (an infinite
    projection), as ``_check_projection`` decides on the other backends."""
    check_finite("embeddings", emb, suspects)
    if logits is not None:
        check_finite("teacher_logits", logits, suspects)
    bad = suspects[torch.isnan(_row_sums(out[suspects]))]
    if bad.numel():
        raise overflow_error(int(bad[0]))


def overflow_error(row: int, vanilla_kd: bool = False) -> ValueError:
    """The error for finite inputs whose targets are not (row ``row``): the projection, or with
    ``vanilla_kd`` the logits / τ, overflowed float32. Also the offline pipeline's."""
    if vanilla_kd:
        return ValueError(f"teacher_logits row {row} is finite but its targets are not: logits / tau overflow "
                          "float32; raise tau or rescale the logits")
    return ValueError(f"embeddings row {row} is finite but its projection (or teacher logit) is not: it "
                      "overflows float32; rescale the embeddings or check the projector")


def _row_sums(out: torch.Tensor) -> torch.Tensor:
    return out.sum(dim=1, dtype=torch.float64 if out.dtype == torch.float64 else torch.float32)


def _check_projection(out: torch.Tensor) -> None:
    """With finite inputs (checked before), a NaN target means the projection overflowed. Log-targets
    are never +inf (an overflow gives inf - inf), and -inf is a target of 0, so a row holds NaN exactly
    when its sum is NaN: one reduction (the masked copy of -inf checked before took 3 passes and
    two N x K buffers)."""
    rows = torch.nonzero(torch.isnan(_row_sums(out))).flatten()
    if rows.numel():
        raise overflow_error(int(rows[0]))


def _check_kd_targets(out: torch.Tensor, logits: torch.Tensor) -> None:
    """The check of vanilla KD's targets, from them: a NaN or infinite logit makes its row's sum of
    targets NaN or -inf, so only rows whose sum is not finite are looked at (a -inf target of finite
    logits, a probability of 0, passes); a NaN row of finite logits is z / τ overflowing. One row sum
    of the targets instead of one of the logits before and one of the targets after (bf16 logits' row
    sums took 90 ms at 262,144 x 300 on 2 cores)."""
    suspects = torch.nonzero(~torch.isfinite(_row_sums(out))).flatten()
    if suspects.numel():
        check_finite("teacher_logits", logits, suspects)
        nan_rows = suspects[torch.isnan(out[suspects]).any(dim=1)]
        if nan_rows.numel():
            raise overflow_error(int(nan_rows[0]), vanilla_kd=True)


def _check_targets(out, check_inputs, teacher_logits, n_subclasses) -> None:
    """The default check of the targets written (``_check_kd_targets`` or ``_check_projection``). CPU
    only: on a GPU the check would synchronise (there a NaN reaches the loss, which stays NaN)."""
    if not (check_inputs and out.device.type == "cpu" and out.numel()):
        return
    if _vanilla_kd(n_subclasses, teacher_logits):
        _check_kd_targets(out, teacher_logits)
    else:
        _check_projection(out)


def lelp_targets(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_classes: int,
    n_subclasses: int,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    beta: float = 1.0,
    tau: float = 1.0,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    check_inputs: bool = True,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Log LELP targets ``log t`` (N x C*S) from teacher embeddings.

    Args:
        embeddings: (N, d) fp32/fp16/bf16 (fp64 on the torch backend) teacher embeddings.
        weight: (d, J) fused map; J = C*S when ``teacher_logits`` is given, else C*S + C.
        bias: (J,) fused offset.
        num_classes, n_subclasses: C and S.
        teacher_logits: (N, C) class logits; when None they come from the last C columns. With
            them and S = 1 the targets are vanilla KD's ``log_softmax(teacher_logits / tau)``, and the
            embeddings are neither read nor checked (only their shape).
        beta, tau: subclass and class temperatures.
        out_dtype: float32, float16 or bfloat16 (float64 on the torch backend).
        backend: "auto", "torch", "cpu", "cuda" or "triton".
        check_inputs: raise naming the first row with NaN/Inf, for CPU tensors (free on the CPU
            kernel, which flags rows whose projection is not finite; one extra read on the torch
            and Triton-interpreter paths). On a GPU nothing is checked, as in ``distill_loss``: the
            check would synchronise and read the inputs again; a NaN row's targets are NaN.
        out: optional preallocated (N, C*S) output whose rows are contiguous; its dtype wins
            over ``out_dtype``. On the Triton backend a view whose first element is not on 16 bytes,
            or whose row stride is of another kind than C*S (a multiple of 16 or not), is written
            through a buffer (one more pass; as embeddings and logits of that kind are copied).
    """
    check_matrix("embeddings", embeddings)
    check_float("embeddings", embeddings)
    check_positive("beta", beta)
    check_positive("tau", tau)
    k = num_classes * n_subclasses
    expected_j = k if teacher_logits is not None else k + num_classes
    check_matrix("weight", weight, cols=expected_j, cols_name="C*S, plus C without teacher_logits")
    if weight.shape[0] != embeddings.shape[1]:
        raise ValueError(
            f"embeddings have d={embeddings.shape[1]} columns but the projector expects d={weight.shape[0]}"
        )
    if bias.shape != (expected_j,):
        raise ValueError(f"bias must have shape ({expected_j},), got {tuple(bias.shape)}")
    if teacher_logits is not None:
        check_matrix("teacher_logits", teacher_logits, cols=num_classes, cols_name="C")
        check_float("teacher_logits", teacher_logits)
        if teacher_logits.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"teacher_logits has {teacher_logits.shape[0]} rows but embeddings has {embeddings.shape[0]}"
            )
    if out is not None:
        out_dtype = out.dtype
    if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16 (float64 on the torch backend), "
                        f"got {out_dtype}")
    if out is not None:
        if out.shape != (embeddings.shape[0], k) or out.device != embeddings.device:
            raise ValueError(
                f"out must be a ({embeddings.shape[0]}, {k}) tensor on {embeddings.device}, "
                f"got {tuple(out.shape)} on {out.device}"
            )
        if out.stride(-1) != 1:
            raise ValueError("out must have contiguous rows (out.stride(-1) == 1)")
        out_dtype = out.dtype

    chosen = _choose_backend(backend, embeddings, teacher_logits, num_classes, n_subclasses, out_dtype)
    # CPU eager only: on a GPU the check would read the inputs once more and synchronise (issue 21
    # item 9: +2.1 ms at 4 M x 768), under torch.compile it would break the graph; there a NaN row's
    # targets are NaN. The CPU kernel flags non-finite rows itself, inside its pass.
    # Vanilla KD reads no embeddings: its logits are checked from the targets (_check_kd_targets).
    on_cpu = embeddings.device.type == "cpu"
    kd = _vanilla_kd(n_subclasses, teacher_logits)
    if check_inputs and chosen != "cpu" and not kd and on_cpu and not torch.compiler.is_compiling():
        check_finite("embeddings", embeddings)
        if teacher_logits is not None:
            check_finite("teacher_logits", teacher_logits)
    if chosen == "torch":
        result = _targets_torch(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out_dtype,
                                out)
        if not torch.compiler.is_compiling():
            _check_targets(result, check_inputs, teacher_logits, n_subclasses)
        return result
    if out is not None and not torch.compiler.is_compiling():
        return _fill(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out, chosen,
                     backend, check_inputs)
    op = _dispatch.eager(_targets_op, embeddings, weight, bias, teacher_logits)
    result = op(embeddings, weight, bias, teacher_logits, num_classes, n_subclasses, float(beta), float(tau), out_dtype,
                chosen, backend, check_inputs)
    if out is None:
        return result
    out.copy_(result)
    return out


@_dispatch.custom_op("lelp_fast::targets", mutates_args=())
def _targets_op(embeddings: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                teacher_logits: Optional[torch.Tensor], num_classes: int, n_subclasses: int, beta: float, tau: float,
                out_dtype: torch.dtype, chosen: str, backend: str, check_inputs: bool) -> torch.Tensor:
    """The compiled kernels as one op: ``torch.compile`` (fullgraph) and CUDA graphs see a single
    call with a fake implementation, not the launcher's host code."""
    out = torch.empty(embeddings.shape[0], num_classes * n_subclasses, dtype=out_dtype, device=embeddings.device)
    return _fill(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out, chosen, backend,
                 check_inputs)


@_targets_op.register_fake
def _(embeddings, weight, bias, teacher_logits, num_classes, n_subclasses, beta, tau, out_dtype, chosen, backend,
      check_inputs):
    return embeddings.new_empty(embeddings.shape[0], num_classes * n_subclasses, dtype=out_dtype)


def _fill(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out, chosen, backend,
          check_inputs):
    """Writes the targets into ``out`` with the compiled backend ``chosen`` (Triton, then CUDA, falling
    back under auto when a launch fails for resources)."""
    if chosen == "triton":
        with _dispatch.launch_device(embeddings):
            chosen = _run_triton(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau,
                                 out.dtype, out, backend)
        if chosen == "triton":
            _check_targets(out, check_inputs, teacher_logits, n_subclasses)
            return out
    # torch for vanilla KD off Triton (log_softmax of the logits), or where a Triton or CUDA launch
    # failed for resources and nothing else takes the shape
    if chosen == "torch" or _vanilla_kd(n_subclasses, teacher_logits):
        with torch.no_grad():  # as the compiled kernels: no gradient to the logits
            _targets_torch(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out.dtype,
                           out)
        _check_targets(out, check_inputs, teacher_logits, n_subclasses)
        return out
    # The kernels read rows by stride but need each row's features contiguous.
    emb = _dispatch.rows_contiguous(embeddings)
    logits = _dispatch.rows_contiguous(teacher_logits)
    try:
        with _dispatch.launch_device(emb):
            return _targets_compiled(emb, weight, bias, num_classes, n_subclasses, logits, beta, tau, out, chosen,
                                     check_inputs)
    except Exception as exc:
        if not (chosen == "cuda" and _dispatch.falls_back(backend) and _dispatch.is_out_of_resources(exc)):
            raise
        _dispatch.record_launch_failure("cuda", _shape_key(embeddings, teacher_logits, num_classes, n_subclasses),
                                        exc)
        return _fill(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out, "torch",
                     backend, check_inputs)


def _shape_key(embeddings, teacher_logits, num_classes, n_subclasses) -> str:
    """The shape as a launch sees it (a failed launch is remembered under it and named in the warning)."""
    head = "teacher logits given" if teacher_logits is not None else "the head's logits"
    return (f"the targets at K = {num_classes * n_subclasses} (C = {num_classes}, S = {n_subclasses}), "
            f"{str(embeddings.dtype).replace('torch.', '')} embeddings, {head}")


def _shape_limits(embeddings, teacher_logits, num_classes, n_subclasses):
    """{backend: why} for the backends that cannot take this call: the Triton and CUDA kernels'
    widths, and launches that already failed for resources at this shape."""
    from ..kernels.triton import limits

    out = {}
    why = limits.targets_unsupported(num_classes, n_subclasses, with_head=teacher_logits is None,
                                     d=embeddings.shape[1])
    if why:
        out["triton"] = why
    cuda_why = _dispatch.cuda_unsupported(num_classes, n_subclasses)
    if cuda_why:
        out["cuda"] = cuda_why
    return {**out, **_dispatch.launch_failures(
        lambda: _shape_key(embeddings, teacher_logits, num_classes, n_subclasses))}


def _choose_backend(backend, embeddings, teacher_logits, num_classes, n_subclasses, out_dtype) -> str:
    """The backend that runs this call: auto skips one that cannot take its shape or dtypes."""
    chosen = _dispatch.resolve(backend, embeddings.device,
                               _shape_limits(embeddings, teacher_logits, num_classes, n_subclasses))
    compiled_ok = (
        (embeddings.dtype in _DTYPE_CODES or _vanilla_kd(n_subclasses, teacher_logits))  # KD reads no embeddings
        and out_dtype in _DTYPE_CODES
        and (teacher_logits is None or teacher_logits.dtype in _DTYPE_CODES)
    )
    if chosen != "torch" and not compiled_ok:
        if backend not in ("auto",):
            raise ValueError(
                f"backend {chosen!r} takes float32/float16/bfloat16 embeddings, logits and out_dtype; "
                f"got embeddings {embeddings.dtype}, out_dtype {out_dtype}. Use backend='torch' for float64"
            )
        chosen = "torch"
    return chosen


def _run_triton(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out_dtype, out,
                backend) -> str:
    """Fills ``out`` with the Triton kernel and returns "triton"; under auto, a launch that fails for
    resources is recorded (one warning naming the shape) and the next backend's name is returned."""
    from ..kernels.triton.targets import targets_triton

    # the kernel reads rows by stride, features contiguously; vanilla KD reads no embeddings
    emb = embeddings if _vanilla_kd(n_subclasses, teacher_logits) else _dispatch.rows_contiguous(embeddings)
    if emb.shape[0]:
        try:
            targets_triton(emb, weight, bias, num_classes, n_subclasses, _dispatch.rows_contiguous(teacher_logits),
                           beta, tau, out)
        except Exception as exc:
            if not (_dispatch.falls_back(backend) and _dispatch.is_out_of_resources(exc)):
                raise
            _dispatch.record_launch_failure("triton", _shape_key(embeddings, teacher_logits, num_classes,
                                                                 n_subclasses), exc)
            return _choose_backend("auto", embeddings, teacher_logits, num_classes, n_subclasses, out_dtype)
    return "triton"
