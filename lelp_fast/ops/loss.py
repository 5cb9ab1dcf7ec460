"""The fused distillation loss: per-row loss and its gradient in one pass over the logits.

``distill_loss`` computes ``τ² · D(t, softmax(s/τ)) + α · CE(y, logsumexp-pool(s))`` per row with
the targets either precomputed (one teacher, or M teachers mixed by per-row weights inside the
kernel) or computed in-kernel from teacher embeddings, then reduces with ordinary torch ops.

The compiled kernels are registered as ``torch.library`` custom ops with fake implementations, so
the loss traces under ``torch.compile`` and has no host synchronisation (no ``.item()``, no
data-dependent shapes): the gradient is produced in the forward pass and scaled by the incoming
gradient in the backward pass. Where no gradient is wanted (``torch.no_grad()``, logits that do not
require one) the kernels run forward only and write none.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import reference
from .._checks import (check_finite, check_integer_labels, check_log_probabilities, check_nonnegative,
                       check_positive, check_row_weights)
from ..kernels.triton import limits as triton_limits
from . import _dispatch, _reused_buffers
from .targets import projected_log_targets

DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "js": 2, "tvd": 3, "mse": 4}
_DTYPE_CODES = _dispatch.DTYPE_CODES


def _divergence_code(divergence: str, jsd_beta: float) -> int:
    """The kernels' code; the generalised JSD's end points are the two KLs exactly (as in TRL)."""
    if divergence == "js" and jsd_beta in (0.0, 1.0):
        return DIVERGENCE_CODES["kl" if jsd_beta == 0.0 else "reverse_kl"]
    return DIVERGENCE_CODES[divergence]


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


@_dispatch.custom_op("lelp_fast::loss_rows", mutates_args=())
def _loss_rows(
    student: Tensor,
    log_targets: Optional[Tensor],
    weights: Optional[Tensor],
    labels: Optional[Tensor],
    embeddings: List[Tensor],
    fused_weight: List[Tensor],
    fused_bias: List[Tensor],
    teacher_logits: List[Optional[Tensor]],
    num_classes: int,
    n_subclasses: int,
    divergence: int,
    jsd_beta: float,
    tau: float,
    alpha: float,
    beta: List[float],
    ignore_index: int,
    compiled: str,
    fall_back: bool,
    check: bool = False,
    grad_scale: Optional[Tensor] = None,
    subclass_weight: float = 1.0,
    need_grad: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compiled kernel: (loss per row (N,) fp32, dL_row/ds (N, K) fp32, the α·CE part of each row's
    loss (N,) fp32, the input check's row flags (N,) uint8 or (0,) without ``check``), from the same
    pass, by the ``compiled`` backend ("triton", "cuda" or "cpu"). With ``fall_back`` (backend auto), a
    Triton or CUDA launch that fails for resources is recorded and the call goes to the next backend
    that takes it. ``check`` (CPU kernel only): bit 0 flags a
    student row whose sum is not finite, bit 1 an offline log-target row whose sum is not <= 0;
    :func:`_raise_on_suspect_rows` looks closer. ``grad_scale`` (a 1-element fp32 tensor on the
    student's device; the Triton, CUDA and CPU kernels fold it in, CUDA reading it on the device):
    the gradient comes as ``grad_scale · dL_row/ds`` in the student's dtype instead (the torch
    fallback, or an extension built before, scales and casts it here: one more pass). ``subclass_weight``
    λ ≠ 1 (KL; the CPU and CUDA kernels, and Triton up to ``limits.MAX_FUSED_WEIGHTED_CLASSES``
    classes: :func:`distill_loss` sends the rest to :func:`subclass_weighted_loss`):
    ``τ² [λ KL(t‖q) + (1 − λ) KL(p‖Q)]`` in the same pass. Without ``need_grad`` (no gradient
    wanted) the kernels run forward only: no gradient is computed or written, and the second output
    is (0, K)."""
    n, k = student.shape
    grad_scale = grad_scale if need_grad else None  # forward only: no gradient to fold a scale into
    loss_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    hard_rows = torch.zeros(n, dtype=torch.float32, device=student.device)
    folded = grad_scale is not None
    kernel_folds = folded and (compiled == "triton" or _extension_folds())
    # a large CPU gradient reuses memory already mapped (ops/_reused_buffers.py: its first write is
    # otherwise a third of the step)
    grad = (_reused_buffers.empty((n, k), student.dtype if kernel_folds else torch.float32, student.device)
            if need_grad else torch.empty(0, k, dtype=torch.float32, device=student.device))
    suspect = torch.zeros(n if check else 0, dtype=torch.uint8, device=student.device)
    if n == 0:
        return loss_rows, grad.to(student.dtype) if folded else grad, hard_rows, suspect
    student = _dispatch.rows_contiguous(student)
    weights = None if weights is None else weights.to(torch.float32).contiguous()
    labels = None if labels is None else labels.to(torch.int64).contiguous()
    if compiled == "triton":
        try:
            with _dispatch.launch_device(student):
                _loss_rows_triton(student, log_targets, weights, labels, embeddings, fused_weight, fused_bias,
                                  teacher_logits, num_classes, n_subclasses, divergence, jsd_beta, tau, alpha, beta,
                                  ignore_index, loss_rows, hard_rows, grad if need_grad else None, grad_scale,
                                  subclass_weight)
            return loss_rows, grad, hard_rows, suspect
        except Exception as exc:
            if not (fall_back and _dispatch.is_out_of_resources(exc)):
                raise
            shape = _shape_key(student, num_classes, n_subclasses, embeddings, subclass_weight)
            _dispatch.record_launch_failure("triton", shape, exc)
            limits = _shape_limits(student, num_classes, n_subclasses, embeddings, teacher_logits, subclass_weight)
            nxt = compiled = _dispatch.resolve("auto", student.device, limits)
            # λ ≠ 1 on a compiled kernel that does not take it (an extension built before): the torch formula
            if nxt == "torch" or (subclass_weight != 1.0 and not _kernel_weights_subclasses(nxt, num_classes,
                                                                                          n_subclasses)):
                loss_rows, grad, hard_rows = _loss_rows_by_torch(
                    student, log_targets, weights, labels, embeddings, fused_weight, fused_bias, teacher_logits,
                    num_classes, n_subclasses, divergence, jsd_beta, tau, alpha, beta, ignore_index, subclass_weight,
                    need_grad)
                return loss_rows, _folded(grad, grad_scale, student.dtype), hard_rows, suspect
            if folded and not _extension_folds():  # the compiled fallback writes fp32; folded below
                kernel_folds = False
                grad = torch.empty(n, k, dtype=torch.float32, device=student.device)
    # scratch (or None) must outlive the launch below
    grad_address, scratch = _grad_address(grad, need_grad, compiled, n, k, student.device)
    if log_targets is not None:
        n_teachers = 1 if log_targets.ndim == 2 else log_targets.shape[1]
        log_targets = log_targets if log_targets.is_contiguous() else log_targets.contiguous()
        targets_args = (_ptr(log_targets), _DTYPE_CODES[log_targets.dtype], n_teachers * k, n_teachers)
    else:
        targets_args = (0, 0, 0, len(embeddings))
    online, keep_alive = [], []
    for emb, w, b, z, teacher_beta in zip(embeddings, fused_weight, fused_bias, teacher_logits, beta):
        emb, z = _dispatch.rows_contiguous(emb), _dispatch.rows_contiguous(z)
        w32, b32 = w.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
        keep_alive += [emb, z, w32, b32]  # the kernel reads raw addresses: keep the copies alive
        online.append((
            emb.data_ptr(), _DTYPE_CODES[emb.dtype], emb.stride(0), emb.shape[1], w32.data_ptr(), b32.data_ptr(),
            w32.shape[1], _ptr(z), 0 if z is None else _DTYPE_CODES[z.dtype], 0 if z is None else z.stride(0),
            float(teacher_beta),
        ))
    on_cuda = student.device.type == "cuda"
    stream = torch.cuda.current_stream(student.device).cuda_stream if on_cuda else 0
    try:
        with _dispatch.launch_device(student):
            _dispatch.extension().loss(
                student.data_ptr(), _DTYPE_CODES[student.dtype], student.stride(0), n, num_classes, n_subclasses,
                *targets_args, _ptr(weights), _ptr(labels), ignore_index, divergence, float(jsd_beta), float(tau),
                float(alpha), loss_rows.data_ptr(), hard_rows.data_ptr(), grad_address, online, on_cuda, stream,
                *((suspect.data_ptr(),) if check else ()),  # by position: an extension built before takes no keywords
                **({"grad_dtype": _DTYPE_CODES[grad.dtype], "grad_scale": grad_scale.data_ptr()}
                   if kernel_folds else {}),
                **({"subclass_weight": float(subclass_weight)} if subclass_weight != 1.0 else {}),
            )
    except Exception as exc:
        if not (fall_back and compiled == "cuda" and _dispatch.is_out_of_resources(exc)):
            raise
        _dispatch.record_launch_failure(
            "cuda", _shape_key(student, num_classes, n_subclasses, embeddings, subclass_weight), exc)
        loss_rows, grad, hard_rows = _loss_rows_by_torch(
            student, log_targets, weights, labels, embeddings, fused_weight, fused_bias, teacher_logits,
            num_classes, n_subclasses, divergence, jsd_beta, tau, alpha, beta, ignore_index, subclass_weight, need_grad)
        return loss_rows, _folded(grad, grad_scale, student.dtype), hard_rows, suspect
    return loss_rows, grad if kernel_folds else _folded(grad, grad_scale, student.dtype), hard_rows, suspect


def _grad_address(grad: Tensor, need_grad: bool, compiled: str, n: int, k: int, device: torch.device):
    """(the gradient's address for the compiled loss, scratch to keep alive until it returns, or None).
    Forward only, the CPU kernel takes no address (it keeps the gradient in its tile's scratch); the
    CUDA kernel, and an extension built before, write a gradient all the same, into scratch. A branch
    around the CUDA kernel's stores cost 1-2 SASS instructions per element (tests/cuda_cost.py: K = 128
    at λ ≠ 1 in bf16 with the hard-label term from 1.49 to 1.51-1.53x the H200's floor) and a second
    set of kernels would double their compile time; Triton, the GPU's default backend, compiles the
    gradient out."""
    if need_grad:
        return grad.data_ptr(), None
    if compiled == "cpu" and _extension_forward_only():
        return 0, None
    scratch = torch.empty(n, k, dtype=torch.float32, device=device)
    return scratch.data_ptr(), scratch


def _extension_forward_only() -> bool:
    """Whether the CPU loss takes no gradient address (forward only; an extension built before could not)."""
    return getattr(_dispatch.extension(), "loss_forward_only", False)


def _extension_folds() -> bool:
    """Whether the compiled loss writes the folded gradient itself (an extension built before could not)."""
    return getattr(_dispatch.extension(), "loss_folds_grad", False)


def _folded(grad: Tensor, grad_scale: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """``grad`` (fp32) as the op returns it: unchanged, or times ``grad_scale`` in ``dtype``."""
    if grad_scale is None:
        return grad
    return torch.mul(grad, grad_scale, out=torch.empty_like(grad, dtype=dtype))


def _loss_rows_triton(student, log_targets, weights, labels, embeddings, fused_weight, fused_bias, teacher_logits,
                      num_classes, n_subclasses, divergence, jsd_beta, tau, alpha, beta, ignore_index, loss_rows,
                      hard_rows, grad, grad_scale=None, subclass_weight=1.0):
    """The Triton path; online teachers' targets go through the targets kernel into an fp32 buffer
    first (N x M x K: a small fraction of the embeddings' bytes), then the loss kernel mixes them."""
    from ..kernels.triton.loss import loss_triton
    from ..kernels.triton.targets import targets_triton

    student = student.contiguous()
    if embeddings:
        n, k = student.shape
        log_targets = torch.empty(n, len(embeddings), k, dtype=torch.float32, device=student.device)
        for i, (emb, w, b, z, teacher_beta) in enumerate(zip(embeddings, fused_weight, fused_bias, teacher_logits,
                                                             beta)):
            emb, z = _dispatch.rows_contiguous(emb), _dispatch.rows_contiguous(z)
            targets_triton(emb, w, b, num_classes, n_subclasses, z, teacher_beta, tau, log_targets[:, i])
        if len(embeddings) == 1:
            log_targets = log_targets[:, 0]
    loss_triton(student, log_targets.contiguous(), weights, labels, num_classes, n_subclasses, divergence, jsd_beta,
                tau, alpha, ignore_index, loss_rows, hard_rows, grad, grad_scale, subclass_weight)


def _loss_rows_by_torch(student, log_targets, weights, labels, embeddings, fused_weight, fused_bias,
                        teacher_logits, num_classes, n_subclasses, divergence, jsd_beta, tau, alpha, beta,
                        ignore_index, subclass_weight=1.0, need_grad=True):
    """The custom op's outputs from the torch path (a compiled launch failed). Autograd does not
    record inside a custom op, so the per-row gradient comes from ``torch.func.vjp`` (rows are
    independent: a vector of ones gives each row's own gradient); without ``need_grad``, none."""
    name = {code: div for div, code in DIVERGENCE_CODES.items()}[divergence]

    def rows(s):
        return _loss_torch(s, log_targets, weights, labels, embeddings, fused_weight, fused_bias, teacher_logits,
                           num_classes, n_subclasses, name, jsd_beta, tau, alpha, beta, ignore_index,
                           subclass_weight)

    if not need_grad:
        per_row, hard_rows = rows(student)
        return per_row.float(), student.new_empty(0, student.shape[1], dtype=torch.float32), hard_rows.float()
    per_row, pullback, hard_rows = torch.func.vjp(rows, student, has_aux=True)
    (grad,) = pullback(torch.ones_like(per_row))
    return per_row.float(), grad.float(), hard_rows.float()


@_loss_rows.register_fake
def _(student, log_targets, weights, labels, embeddings, fused_weight, fused_bias, teacher_logits,
      num_classes, n_subclasses, divergence, jsd_beta, tau, alpha, beta, ignore_index, compiled, fall_back,
      check=False, grad_scale=None, subclass_weight=1.0, need_grad=True):
    n, k = student.shape
    grad_dtype = torch.float32 if grad_scale is None or not need_grad else student.dtype
    return (student.new_empty(n, dtype=torch.float32), student.new_empty(n if need_grad else 0, k, dtype=grad_dtype),
            student.new_empty(n, dtype=torch.float32), student.new_empty(n if check else 0, dtype=torch.uint8))


@_dispatch.custom_op("lelp_fast::scale_rows", mutates_args=())
def _scale_rows(grad: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``(grad * rows[:, None]).to(dtype)`` in one pass on CPU (torch's mul into a bf16 ``out`` is a slow
    casting loop; mul then ``.to`` is two passes)."""
    ext = _dispatch.extension()
    if grad.device.type != "cpu" or dtype not in _DTYPE_CODES or ext is None or not hasattr(ext, "scale_rows"):
        # One pass from the fp32 gradient into the student's dtype on a GPU (read 4 B, write 2 B
        # per element; a scale in place and then a cast took 14).
        return torch.mul(grad, rows.unsqueeze(1), out=torch.empty_like(grad, dtype=dtype))
    grad, rows = grad.contiguous(), rows.to(torch.float32).contiguous()
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if grad.numel():
        ext.scale_rows(grad.data_ptr(), rows.data_ptr(), grad.shape[0], grad.shape[1], _DTYPE_CODES[dtype],
                       out.data_ptr())
    return out


@_scale_rows.register_fake
def _(grad, rows, dtype):
    return torch.empty(grad.shape, dtype=dtype, device=grad.device)


class _RowsWithGrad(torch.autograd.Function):
    """Per-row losses whose gradient w.r.t. the student logits was computed in the forward pass."""

    @staticmethod
    def forward(ctx, student: Tensor, loss_rows: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        return loss_rows

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        (grad,) = ctx.saved_tensors
        if ctx.student_dtype != grad.dtype:  # scaled and cast in one pass (fp32 read, bf16/fp16 write)
            return _dispatch.eager(_scale_rows, grad, grad_rows)(grad, grad_rows, ctx.student_dtype), None, None
        # In place: no second N x K buffer. A second backward (retain_graph=True) is refused by
        # autograd's version counter rather than silently scaled twice.
        return grad.mul_(grad_rows.unsqueeze(1)), None, None


@_dispatch.custom_op("lelp_fast::scale_unless_one", mutates_args=("grad",))
def _scale_unless_one(grad: Tensor, scale: Tensor) -> None:
    """``grad *= scale`` in place unless ``scale`` (one element) is 1, decided on the device: on a
    GPU every program of the Triton kernel reads the scale and returns at once when it is 1 (no
    N x K pass, no host sync, CUDA-graph safe)."""
    if grad.device.type == "cuda":
        try:
            from ..kernels.triton.loss import scale_unless_one
        except ImportError:  # the CUDA backend without Triton: one N x K pass, still no host sync
            grad.mul_(scale.reshape(()))
            return
        with _dispatch.launch_device(grad):
            scale_unless_one(grad, scale.reshape(1).to(torch.float32))
    elif float(scale) != 1.0:
        grad.mul_(scale)


@_scale_unless_one.register_fake
def _(grad, scale):
    return None


class _ReducedWithGrad(torch.autograd.Function):
    """A reduced (mean or sum) loss whose gradient w.r.t. the student logits the kernel wrote in the
    forward pass, in the student's dtype with the reduction's scale folded in: the backward hands
    it on as it is when the incoming gradient is 1 (``loss.backward()``), and scales it in place
    otherwise (an AMP loss scale, a weighted sum of losses). It is handed on, not copied (autograd
    keeps it as a leaf's ``.grad``), so a second backward through the same graph is refused."""

    @staticmethod
    def forward(ctx, student: Tensor, loss_rows: Tensor, divisor: Union[Tensor, float], grad: Tensor) -> Tensor:
        """The rows' sum over the reduction's ``divisor`` (``_reduction_divisor``; the kernel folded its
        reciprocal into ``grad``): the mean's row count is taken once a step, not again for the loss."""
        ctx.save_for_backward(grad)
        total = loss_rows.sum()
        return total if isinstance(divisor, float) and divisor == 1.0 else total / divisor

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if not torch.compiler.is_compiling():  # before the saved gradient is unpacked: on a GPU the
            # first backward's in-place scale bumped its version, and autograd's own error would say less
            if getattr(ctx, "handed_on", False):
                raise RuntimeError("lelp_fast: the fused loss's gradient was handed on by the first backward; "
                                   "backward through the same loss twice (retain_graph=True) is not supported "
                                   "(backend='torch' supports it)")
            ctx.handed_on = True
        (grad,) = ctx.saved_tensors  # scaled in place below: autograd's version counter catches a reuse
        if grad_output.device.type == "cpu" and not torch.compiler.is_compiling():
            if float(grad_output) != 1.0:  # no sync on the CPU; the common loss.backward() moves nothing
                grad.mul_(grad_output)
        else:
            _dispatch.eager(_scale_unless_one, grad, grad_output)(grad, grad_output)
        return grad, None, None, None


def _reduction_divisor(student: Tensor, labels: Optional[Tensor], ignore_index: int,
                       reduction: str) -> Union[Tensor, float]:
    """What ``reference.reduce_rows`` divides the rows' sum by, and as it does: 1 for the sum, the rows
    for the mean without labels (host numbers), and with labels the rows kept, at least 1, counted in
    int64 and cast once, a 0-dim fp32 tensor on the labels' device (no host sync)."""
    if reduction == "sum":
        return 1.0
    if labels is None:
        return float(max(student.shape[0], 1))
    return (labels != ignore_index).sum().clamp_(min=1).to(torch.float32)


def _reciprocal(divisor: Union[Tensor, float], device: torch.device) -> Tensor:
    """dloss/dloss_row of a kept row, as the kernels take it: a 1-element fp32 tensor, on the divisor's
    device (a host number's on ``device``)."""
    if isinstance(divisor, Tensor):
        return torch.reciprocal(divisor).reshape(1)
    return torch.full((1,), 1.0 / divisor, dtype=torch.float32, device=device)


# The student dtypes whose gradient the compiled kernels write with the reduction folded in. fp16 is
# left out: at 1/rows the gradient falls into fp16's subnormals before an AMP loss scale (the
# backward's grad_output) could lift it; it keeps the fp32 gradient scaled and cast in the backward.
_FOLDED_DTYPES = (torch.float32, torch.bfloat16)


def distill_loss(
    student_logits: Tensor,
    log_targets: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    *,
    num_classes: int,
    n_subclasses: int,
    divergence: str = "kl",
    jsd_beta: float = 0.5,
    tau: float = 1.0,
    alpha: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    teacher_weights: Optional[Tensor] = None,
    embeddings: Union[Tensor, Sequence[Tensor], None] = None,
    fused_weight: Union[Tensor, Sequence[Tensor], None] = None,
    fused_bias: Union[Tensor, Sequence[Tensor], None] = None,
    teacher_logits: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
    beta: Union[float, Sequence[float]] = 1.0,
    backend: str = "auto",
    check_inputs: bool = True,
    return_components: bool = False,
    subclass_weight: Optional[float] = 1.0,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """The distillation loss of docs/algorithm.md, fused where a compiled backend is available.

    Targets: ``log_targets`` (N, K), or (N, M, K) with ``teacher_weights`` (N, M) (rows summing
    to 1) mixed as ``t = Σ_m w_m t_m`` inside the kernel; or ``embeddings`` (N, d) with the
    projector's ``fused_weight``/``fused_bias`` (and optional ``teacher_logits``), computed
    in-kernel at temperatures ``beta``, ``tau``; or M teachers online: lists of M embeddings
    (each (N, d_m)), fused maps, teacher logits (or None) and betas, with ``teacher_weights``
    (N, M), each teacher's targets computed and mixed in the kernel. With S = 1 and every teacher's
    logits given, online targets are vanilla KD's ``log_softmax(z/τ)``: the embeddings are neither
    read nor checked. Rows labelled ``ignore_index`` contribute 0.

    A NaN input never gives a finite loss: it propagates to that row's loss and gradient (so
    anomaly detection and AMP scalers see it). With ``check_inputs`` (default) CPU tensors in eager
    mode are checked first, raising with the argument and row named: non-finite logits,
    embeddings or weights, log-targets with NaN/+Inf, weights < 0 or rows not summing to 1. On a
    GPU or under ``torch.compile`` the check would synchronise or break the graph, so it is
    skipped there: bad values propagate as NaN, and weights that do not sum to 1 scale the loss.
    Label dtypes are checked everywhere (floats are refused; no synchronisation needed).

    ``subclass_weight`` λ (KL only) weights the subclass part of
    ``KL(t‖q) = KL(p‖Q) + Σ_c p_c KL(r_c‖ρ_c)``: 0 is KD on the pooled student, 1 (this op's
    default, the formula as the kernels compute it) LELP; ``None`` is the library's default
    (:data:`lelp_fast.reference.DEFAULT_SUBCLASS_WEIGHT` with KL, 1 otherwise), which ``LELPLoss``
    and ``TrainSettings`` use. With S = 1 there is no subclass part and λ changes nothing (the
    plain loss runs: S = 1 is vanilla KD exactly). See :func:`subclass_weighted_loss`.
    """
    divergence = reference.canonical_divergence(divergence)  # "jsd" (TRL's and Liger's name) is "js"
    subclass_weight = reference.resolve_subclass_weight(subclass_weight, divergence)
    _refuse_weights_to_train(teacher_weights)
    weighted = subclass_weight != 1.0 and n_subclasses > 1
    if weighted:
        _check_subclass_weight(subclass_weight, divergence)
    _check_settings(divergence, jsd_beta, reduction, tau, alpha, labels)
    given = dict(embeddings=embeddings, fused_weight=fused_weight, fused_bias=fused_bias,
                 teacher_logits=teacher_logits, beta=beta)
    embeddings, fused_weight, fused_bias, teacher_logits, beta = _check_shapes(
        student_logits, log_targets, labels, teacher_weights, embeddings, fused_weight, fused_bias, teacher_logits,
        beta, num_classes, n_subclasses)
    if _vanilla_kd_teachers(n_subclasses, teacher_logits):  # the embeddings are not read: offline targets
        log_targets = _vanilla_kd_log_targets(student_logits, teacher_logits, teacher_weights, tau, check_inputs)
        embeddings, fused_weight, fused_bias, teacher_logits, beta = [], [], [], [], []
    chosen = _choose_backend(backend, student_logits, log_targets, embeddings, teacher_logits, num_classes,
                             n_subclasses, subclass_weight)
    if weighted and not _kernel_weights_subclasses(chosen, num_classes, n_subclasses):
        # The CPU and CUDA kernels, and Triton for few classes, take λ in their one pass; the others
        # get two fused calls.
        return subclass_weighted_loss(
            student_logits, log_targets, labels, subclass_weight=subclass_weight, num_classes=num_classes,
            n_subclasses=n_subclasses, divergence=divergence, teacher_weights=teacher_weights, tau=tau, alpha=alpha,
            reduction=reduction, ignore_index=ignore_index, backend=backend, check_inputs=check_inputs,
            return_components=return_components, **given)
    # CPU eager only: on a GPU the check would synchronise, and under torch.compile it would break the graph.
    # The CPU kernel flags suspect rows of the logits and log-targets in its own pass (fused_check):
    # no extra pass over N x K here, and only flagged rows are inspected after it.
    eager_cpu = student_logits.device.type == "cpu" and not torch.compiler.is_compiling()
    fused_check = eager_cpu and check_inputs and chosen == "cpu"
    if eager_cpu:
        _check_cpu_inputs(student_logits, log_targets, labels, teacher_weights, embeddings, teacher_logits,
                          num_classes, ignore_index, check_inputs, rows_checked_in_kernel=fused_check)
        if check_inputs and divergence == "mse" and log_targets is not None:
            check_finite("log_targets (divergence='mse' compares logits: a target of exactly 0 has none)",
                         log_targets)
        if check_inputs and divergence == "reverse_kl" and log_targets is not None:
            _check_no_zero_target(log_targets, teacher_weights, labels, ignore_index)
    # No gradient wanted (torch.no_grad(), inference mode, logits that do not require one, as in an
    # evaluation loop): the compiled kernels run forward only and write no N x K gradient.
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    # The compiled kernels fold τ, the reduction's scale and the cast into the gradient they write:
    # the loss step moves s and t once and the gradient once (issue 21).
    fold = (need_grad and reduction != "none" and student_logits.dtype in _FOLDED_DTYPES
            and (chosen == "triton" or (chosen in ("cpu", "cuda") and _extension_folds())))
    if chosen == "torch":
        per_row, hard_rows = _loss_torch(student_logits, log_targets, teacher_weights, labels, embeddings,
                                         fused_weight, fused_bias, teacher_logits, num_classes, n_subclasses,
                                         divergence, jsd_beta, tau, alpha, beta, ignore_index)
    else:
        op = _dispatch.eager(_loss_rows, student_logits, log_targets, teacher_weights, labels, embeddings,
                             fused_weight, fused_bias, teacher_logits)
        divisor = _reduction_divisor(student_logits, labels, ignore_index, reduction) if fold else None
        loss_rows, grad, hard_rows, suspect = op(
            student_logits.detach(), log_targets, teacher_weights, labels, embeddings, fused_weight, fused_bias,
            teacher_logits, num_classes, n_subclasses, _divergence_code(divergence, jsd_beta), float(jsd_beta),
            float(tau), float(alpha), beta, int(ignore_index), chosen, _dispatch.falls_back(backend),
            fused_check, None if divisor is None else _reciprocal(divisor, student_logits.device),
            float(subclass_weight) if weighted else 1.0, need_grad,
        )
        if fused_check:
            _raise_on_suspect_rows(suspect, student_logits, log_targets)
        if fold:
            per_row = loss_rows
            loss = _ReducedWithGrad.apply(student_logits, loss_rows, divisor, grad)
        else:
            per_row = _RowsWithGrad.apply(student_logits, loss_rows, grad) if need_grad else loss_rows
    if not fold:
        loss = reference.reduce_rows(per_row, labels, ignore_index, reduction)
    if not return_components:
        return loss
    if alpha == 0.0 or labels is None:  # no hard-label term: a zero, not a masked reduction of zeros
        hard = torch.zeros_like(loss.detach())
    else:
        hard = reference.reduce_rows(hard_rows.detach(), labels, ignore_index, reduction)
    return loss, loss.detach() - hard, hard  # the reductions are linear: soft needs no second one


def subclass_weighted_loss(student_logits: Tensor, log_targets: Optional[Tensor], labels: Optional[Tensor] = None,
                           *, subclass_weight: float, num_classes: int, n_subclasses: int, divergence: str = "kl",
                           embeddings=None, teacher_weights=None, fused_weight=None, fused_bias=None,
                           teacher_logits=None, beta: Union[float, Sequence[float]] = 1.0, tau: float = 1.0,
                           alpha: float = 0.0, reduction: str = "mean", ignore_index: int = -100,
                           backend: str = "auto", check_inputs: bool = True, return_components: bool = False):
    """``τ² [KL(p‖Q) + λ Σ_c p_c KL(r_c‖ρ_c)] + α CE`` as two calls of the fused loss (torch, and
    Triton above ``limits.MAX_FUSED_WEIGHTED_CLASSES`` classes; the CPU and CUDA kernels take λ in
    their own pass, ``kl_row_subclass_weighted``, and so does Triton's up to that many classes):
    ``λ · τ² KL(t‖q) + (1 − λ) · τ² KL(p‖Q)``, since ``KL(t‖q) = KL(p‖Q) + Σ_c p_c KL(r_c‖ρ_c)``.
    ``KL(p‖Q)`` is the S = 1 loss of the pooled logits ``τ·logsumexp(s/τ)`` (their softmax at τ is
    Q) against ``log p = logsumexp_s log t`` (subclass targets sum to the teacher's class
    probability); the gradient reaches ``s`` through the pooling. Mixed (N, M, K) targets and online
    teachers (embeddings with their fused maps) are first made into one (N, K) log-target tensor in
    torch, without gradient, as the torch backend computes them; the two calls then take it. Tested
    against :func:`reference.subclass_weighted_kl` (fp64)."""
    _check_subclass_weight(subclass_weight, divergence)
    _check_settings(divergence, 0.5, reduction, tau, alpha, labels)
    _refuse_weights_to_train(teacher_weights)
    online = _check_shapes(student_logits, log_targets, labels, teacher_weights, embeddings, fused_weight, fused_bias,
                           teacher_logits, beta, num_classes, n_subclasses)  # the plain loss's errors
    eager_cpu = student_logits.device.type == "cpu" and not torch.compiler.is_compiling()
    if check_inputs and eager_cpu and log_targets is not None:
        check_log_probabilities("log_targets", log_targets)  # named as given, before they are pooled
    if embeddings is not None or teacher_weights is not None:
        log_targets = _one_teachers_targets(student_logits, log_targets, teacher_weights, *online, num_classes,
                                            n_subclasses, tau, check_inputs and eager_cpu)
    common = dict(reduction=reduction, ignore_index=ignore_index, backend=backend, check_inputs=check_inputs)
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    n = student_logits.shape[0]
    pooled = reference.class_logits(student_logits.to(compute), num_classes, n_subclasses, tau)
    log_p = torch.logsumexp(log_targets.to(compute).reshape(n, num_classes, n_subclasses), -1)
    # With λ ≠ 0 the second call checks the student, the targets and the labels as given; the pooled
    # log p, summed from rounded 16-bit targets, can be a little above 0 (2.4e-3 at C = 1 in bf16),
    # which the check of log-probabilities would refuse although the targets given pass it
    pooled_checks = {**common, "check_inputs": False} if subclass_weight != 0.0 else common
    loss = (1.0 - subclass_weight) * distill_loss(pooled, log_p, labels, num_classes=num_classes, n_subclasses=1,
                                                  tau=tau, **pooled_checks)
    if subclass_weight != 0.0:
        loss = loss + subclass_weight * distill_loss(student_logits, log_targets, labels, num_classes=num_classes,
                                                     n_subclasses=n_subclasses, tau=tau, **common)
    hard = torch.zeros_like(loss.detach())
    if alpha != 0.0:
        if labels is None:
            raise ValueError("labels are required when alpha != 0 (the hard-label term needs them)")
        rows = reference.hard_label_rows(student_logits.to(compute), labels.long(), num_classes, n_subclasses,
                                         ignore_index)
        hard_term = alpha * reference.reduce_rows(rows, labels, ignore_index, reduction)
        loss, hard = loss + hard_term, hard_term.detach()
    if not return_components:
        return loss
    return loss, loss.detach() - hard, hard


def _check_no_zero_target(log_targets: Tensor, weights: Optional[Tensor], labels: Optional[Tensor],
                          ignore_index: int) -> None:
    """Reverse KL is KL(q‖t): a target of exactly 0 (log -inf, as a top-k store's other classes)
    makes it infinite. A mixture's target is 0 only where every teacher of weight > 0 has 0; a row
    labelled ``ignore_index`` counts for nothing."""
    zero = torch.isneginf(log_targets)
    if log_targets.ndim == 3:
        zero = (zero | (weights == 0).unsqueeze(-1)).all(1)
    zero = zero.any(-1)
    if labels is not None:
        zero &= labels != ignore_index
    rows = torch.nonzero(zero).flatten()
    if rows.numel():
        raise ValueError(f"log_targets row {int(rows[0])} has a target of exactly 0 (log = -inf, as top-k stores "
                         "hold): divergence='reverse_kl' is KL(q‖t), infinite there; use kl")


def _refuse_weights_to_train(teacher_weights: Optional[Tensor]) -> None:
    """Mixing weights that want a gradient: the fused loss takes the targets and their weights as
    constants, so a weighting network trained through it would get none, silently."""
    if teacher_weights is not None and teacher_weights.requires_grad and torch.is_grad_enabled():
        raise ValueError("teacher_weights require a gradient, but this loss takes the targets and their mixing "
                         "weights as constants (no gradient reaches them): train a weighting network with "
                         "InstanceTeacherWeights.mixture_loss, or pass teacher_weights.detach()")


def _check_subclass_weight(subclass_weight: float, divergence: str) -> None:
    if divergence != "kl":
        raise ValueError(f"subclass_weight needs divergence='kl' (the split into class and subclass KL is exact "
                         f"only for KL), got divergence={divergence!r}")
    if not subclass_weight >= 0.0:
        raise ValueError(f"subclass_weight must be >= 0 (0: KD, 1: LELP), got {subclass_weight!r}")


def _kernel_weights_subclasses(chosen: str, num_classes: int, n_subclasses: int) -> bool:
    """Whether the backend chosen takes the subclass weight λ in its own pass at this shape."""
    if chosen == "triton":
        from ..kernels.triton import limits

        return limits.weighted_loss_unfused(num_classes, n_subclasses) is None
    return chosen in ("cpu", "cuda") and _extension_weights_subclasses()


def _extension_weights_subclasses() -> bool:
    """Whether the compiled loss (CPU and CUDA) takes the subclass weight λ (an extension built before could not)."""
    return getattr(_dispatch.extension(), "loss_subclass_weight", False)


def _one_teachers_targets(student, log_targets, weights, embeddings, fused_weight, fused_bias, teacher_logits,
                          beta, num_classes, n_subclasses, tau, check_values) -> Tensor:
    """(N, K) log-targets from mixed (N, M, K) ones or from online teachers (the lists of
    :func:`_check_shapes`), in torch and without gradient (the torch backend's arithmetic), in fp32
    (fp64 for fp64 logits)."""
    if check_values:
        _check_teacher_inputs(embeddings, teacher_logits, weights)
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    k = num_classes * n_subclasses
    with torch.no_grad():
        if not embeddings:
            return reference.mix_log_targets(log_targets.to(compute), weights.to(compute))
        return _online_log_targets(embeddings, fused_weight, fused_bias, teacher_logits, beta, weights, n_subclasses,
                                   k, tau, compute)


def _online_log_targets(embeddings, fused_weight, fused_bias, teacher_logits, beta, weights, n_subclasses, k, tau,
                        compute: torch.dtype) -> Tensor:
    """(N, K) log-targets of online teachers (each ``h @ W + b``: K subclass logits, then the class
    logits when none are given), mixed by ``weights`` when there are several, in ``compute``."""
    per_teacher = []
    for emb, w, b, z, teacher_beta in zip(embeddings, fused_weight, fused_bias, teacher_logits, beta):
        per_teacher.append(projected_log_targets(emb, w, b, k, z, n_subclasses, teacher_beta, tau, compute))
    if len(per_teacher) == 1:
        return per_teacher[0]
    return reference.mix_log_targets(torch.stack(per_teacher, 1), weights.to(compute))


def _vanilla_kd_teachers(n_subclasses: int, teacher_logits: List[Optional[Tensor]]) -> bool:
    """Online teachers (the lists of :func:`_check_shapes`) that are all vanilla KD: one subclass per
    class, each teacher's logits given (``limits.vanilla_kd``)."""
    return bool(teacher_logits) and all(triton_limits.vanilla_kd(n_subclasses, z is not None) for z in teacher_logits)


def _vanilla_kd_log_targets(student: Tensor, teacher_logits: List[Tensor], weights: Optional[Tensor], tau: float,
                            check_inputs: bool) -> Tensor:
    """Vanilla KD teachers' log-targets ``log_softmax(z_m / τ)`` as offline ones: (N, K) for one teacher
    without weights, else (N, M, K) for ``weights`` to mix; fp32 (fp64 for an fp64 student), without
    gradient. Their logits are checked first (CPU eager, ``check_inputs``), named as passed: the
    embeddings, which these targets do not depend on, are neither read nor checked (as ``lelp_targets``)."""
    if check_inputs and student.device.type == "cpu" and not torch.compiler.is_compiling():
        for i, z in enumerate(teacher_logits):
            check_finite(f"teacher_logits[{i}]", z)
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        per_teacher = [torch.log_softmax(z.to(compute) / tau, dim=-1) for z in teacher_logits]
    return per_teacher[0] if weights is None and len(per_teacher) == 1 else torch.stack(per_teacher, 1)


def _check_settings(divergence, jsd_beta, reduction, tau, alpha, labels) -> None:
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCE_CODES)}, got {divergence!r}")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must lie in [0, 1] (0: forward KL, 1: reverse KL), got {jsd_beta!r}")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    if labels is not None:
        check_integer_labels("labels", labels)
    check_positive("tau", tau)
    check_nonnegative("alpha", alpha)
    if alpha != 0.0 and labels is None:
        raise ValueError("labels are required when alpha != 0 (the hard-label term needs them)")


def _check_shapes(student_logits, log_targets, labels, teacher_weights, embeddings, fused_weight, fused_bias,
                  teacher_logits, beta, num_classes, n_subclasses):
    """Checks the shapes; returns the online teachers' arguments as lists (empty offline)."""
    k = num_classes * n_subclasses
    if student_logits.ndim != 2 or student_logits.shape[1] != k:
        raise ValueError(f"student_logits must have shape (N, {k}) = (N, C*S), got {tuple(student_logits.shape)}")
    n = student_logits.shape[0]
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if (log_targets is None) == (embeddings is None):
        raise ValueError("pass exactly one of log_targets (offline) or embeddings (online)")
    if log_targets is None:
        return _online_teachers(n, k, num_classes, embeddings, fused_weight, fused_bias, teacher_logits, beta,
                                teacher_weights)
    multi = log_targets.ndim == 3
    if log_targets.shape[0] != n or log_targets.shape[-1] != k or log_targets.ndim not in (2, 3):
        raise ValueError(f"log_targets must have shape ({n}, {k}) or ({n}, M, {k}), got {tuple(log_targets.shape)}")
    if multi and (teacher_weights is None or teacher_weights.shape != log_targets.shape[:2]):
        given = "none were given" if teacher_weights is None else f"got {tuple(teacher_weights.shape)}"
        raise ValueError(f"log_targets of shape {tuple(log_targets.shape)} are M = {log_targets.shape[1]} teachers' "
                         f"targets, whose per-row weights teacher_weights of shape {tuple(log_targets.shape[:2])} "
                         f"are needed ({given}); one teacher's are ({n}, {k})")
    if not multi and teacher_weights is not None:
        raise ValueError("teacher_weights needs log_targets of shape (N, M, K)")
    return [], [], [], [], []  # no online teachers


def _choose_backend(backend, student_logits, log_targets, embeddings, teacher_logits, num_classes,
                    n_subclasses, subclass_weight=1.0) -> str:
    """The backend that runs this call: auto skips one that cannot take its shape or dtypes."""
    limits = _shape_limits(student_logits, num_classes, n_subclasses, embeddings, teacher_logits, subclass_weight)
    chosen = _dispatch.resolve(backend, student_logits.device, limits)
    dtypes = [t.dtype for t in (student_logits, log_targets, *embeddings, *teacher_logits) if t is not None]
    if chosen != "torch" and not all(dt in _DTYPE_CODES for dt in dtypes):
        if backend != "auto":
            raise ValueError(f"backend {chosen!r} takes float32/float16/bfloat16 tensors; use backend='torch' for float64")
        chosen = "torch"
    return chosen


def _check_cpu_inputs(student, log_targets, labels, weights, embeddings, teacher_logits, num_classes, ignore_index,
                      check_values, rows_checked_in_kernel=False):
    """Label range always; with ``check_values``, NaN/Inf rows and mixing weights (names the row).
    ``rows_checked_in_kernel``: the logits and log-targets are left to the kernel's row flags."""
    if labels is not None and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"labels[{row}] = {int(labels[row])} is out of range [0, {num_classes - 1}]")
    if not check_values:
        return
    if not rows_checked_in_kernel:
        check_finite("student_logits", student.detach())
        if log_targets is not None:
            check_log_probabilities("log_targets", log_targets)
    _check_teacher_inputs(embeddings, teacher_logits, weights)


def _check_teacher_inputs(embeddings, teacher_logits, weights) -> None:
    """Online teachers' embeddings and logits finite, mixing weights valid (one error naming the input)."""
    for i, (emb, z) in enumerate(zip(embeddings, teacher_logits)):
        check_finite(f"embeddings[{i}]", emb)
        if z is not None:
            check_finite(f"teacher_logits[{i}]", z)
    if weights is not None:
        check_row_weights("teacher_weights", weights)


def _raise_on_suspect_rows(suspect: Tensor, student: Tensor, log_targets: Optional[Tensor]) -> None:
    """The exact checks of the rows the kernel flagged (the same errors as the unfused check)."""
    if not bool(suspect.any()):
        return
    rows = torch.nonzero(suspect & 1).flatten()
    if rows.numel():
        check_finite("student_logits", student.detach(), suspects=rows)
    rows = torch.nonzero(suspect & 2).flatten()
    if rows.numel() and log_targets is not None:
        check_log_probabilities("log_targets", log_targets, suspects=rows)


def _shape_key(student, num_classes, n_subclasses, embeddings, subclass_weight=1.0) -> str:
    """The shape as a launch sees it (a failed launch is remembered under it and named in the warning):
    the subclass weight λ ≠ 1 in Triton's one pass is its own code, with its own resources."""
    online = f", online targets from {len(embeddings)} teacher(s)" if embeddings else ""
    one_pass = subclass_weight != 1.0 and n_subclasses > 1 and _kernel_weights_subclasses("triton", num_classes,
                                                                                          n_subclasses)
    weighted = ", λ ≠ 1 in one pass" if one_pass else ""
    return (f"the loss at K = {num_classes * n_subclasses} (C = {num_classes}, S = {n_subclasses}), "
            f"{str(student.dtype).replace('torch.', '')} logits{online}{weighted}")


def _shape_limits(student, num_classes, n_subclasses, embeddings, teacher_logits, subclass_weight=1.0):
    """{backend: why} for the backends that cannot take this call: the Triton and CUDA kernels'
    widths, and launches that already failed for resources at this shape."""
    from ..kernels.triton import limits

    why = limits.loss_unsupported(num_classes, n_subclasses)
    for emb, z in zip(embeddings, teacher_logits) if embeddings else ():
        why = why or limits.targets_unsupported(num_classes, n_subclasses, with_head=z is None, d=emb.shape[-1])
    out = {"triton": why} if why else {}
    cuda_why = _dispatch.cuda_unsupported(num_classes, n_subclasses, len(embeddings) if embeddings else 0)
    if cuda_why:
        out["cuda"] = cuda_why
    return {**out, **_dispatch.launch_failures(
        lambda: _shape_key(student, num_classes, n_subclasses, embeddings, subclass_weight))}


def _online_teachers(n, k, num_classes, embeddings, fused_weight, fused_bias, teacher_logits, beta, weights):
    """Checks the online arguments and returns them as lists, one entry per teacher."""
    if isinstance(embeddings, Tensor):
        embeddings, fused_weight, fused_bias = [embeddings], [fused_weight], [fused_bias]
        teacher_logits = [teacher_logits]
    embeddings, fused_weight, fused_bias = list(embeddings), list(fused_weight or []), list(fused_bias or [])
    m = len(embeddings)
    teacher_logits = [None] * m if teacher_logits is None else list(teacher_logits)
    beta = [float(beta)] * m if isinstance(beta, (int, float)) else [float(b) for b in beta]
    for name, values in (("fused_weight", fused_weight), ("fused_bias", fused_bias),
                         ("teacher_logits", teacher_logits), ("beta", beta)):
        if len(values) != m:
            raise ValueError(f"{name} must have one entry per teacher ({m}), got {len(values)}")
    if m == 0:
        raise ValueError("embeddings must hold at least one teacher's (N, d) embeddings")
    if m > 1 and (weights is None or tuple(weights.shape) != (n, m)):
        raise ValueError(f"teacher_weights must have shape ({n}, {m}) for {m} online teachers")
    if m == 1 and weights is not None:
        raise ValueError("teacher_weights needs several teachers (M > 1)")
    for i, (emb, w, b, z, bt) in enumerate(zip(embeddings, fused_weight, fused_bias, teacher_logits, beta)):
        if emb.ndim != 2 or emb.shape[0] != n:
            raise ValueError(f"embeddings[{i}] must have shape ({n}, d), got {tuple(emb.shape)}")
        j = k if z is not None else k + num_classes
        if w is None or b is None or tuple(w.shape) != (emb.shape[1], j) or tuple(b.shape) != (j,):
            raise ValueError(f"fused_weight[{i}]/fused_bias[{i}] must have shapes ({emb.shape[1]}, {j}) and ({j},)")
        if z is not None and tuple(z.shape) != (n, num_classes):
            raise ValueError(f"teacher_logits[{i}] must have shape ({n}, {num_classes}), got {tuple(z.shape)}")
        if not bt > 0:
            raise ValueError(f"beta[{i}] must be > 0, got {bt}")
    return embeddings, fused_weight, fused_bias, teacher_logits, beta


def _loss_torch(student, log_targets, weights, labels, embeddings, fused_weight, fused_bias, teacher_logits,
                num_classes, n_subclasses, divergence, jsd_beta, tau, alpha, beta, ignore_index, subclass_weight=1.0):
    """(per-row loss, its α·CE part) in fp32 (fp64 for fp64 logits); ``subclass_weight`` λ ≠ 1 (KL):
    the soft part is :func:`reference.subclass_weighted_kl` (the fallback of a fused λ launch)."""
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    labels = None if labels is None else labels.long()  # any integer dtype, as the kernels take
    if embeddings:
        log_t = _online_log_targets(embeddings, fused_weight, fused_bias, teacher_logits, beta, weights, n_subclasses,
                                    num_classes * n_subclasses, tau, compute)
    elif log_targets.ndim == 3:
        log_t = reference.mix_log_targets(log_targets.to(compute), weights.to(compute))
    else:
        log_t = log_targets.to(compute)
    if subclass_weight != 1.0:
        per_row = reference.subclass_weighted_kl(student.to(compute), log_t.detach(), num_classes, n_subclasses, tau,
                                                 subclass_weight)
        if alpha != 0.0 and labels is not None:
            per_row = per_row + alpha * reference.hard_label_rows(student.to(compute), labels, num_classes,
                                                                  n_subclasses, ignore_index)
        if labels is not None:
            per_row = torch.where(labels != ignore_index, per_row, torch.zeros_like(per_row))
    else:
        per_row = reference.distillation_loss(
            student.to(compute), log_t.detach(), labels, num_classes=num_classes, n_subclasses=n_subclasses,
            divergence_kind=divergence, jsd_beta=jsd_beta, tau=tau, alpha=alpha, reduction="none",
            ignore_index=ignore_index,
        )
    hard_rows = torch.zeros_like(per_row.detach())
    if alpha != 0.0 and labels is not None:
        with torch.no_grad():
            hard_rows = alpha * reference.hard_label_rows(student.to(compute), labels, num_classes, n_subclasses,
                                                          ignore_index)
    return per_row, hard_rows
