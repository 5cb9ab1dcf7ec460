"""``LELPLoss``: the distillation loss as an ``nn.Module`` (offline or online targets)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import reference
from ._checks import check_choice, check_count, check_nonnegative, check_positive
from ._derived import on_device
from .ops import _dispatch
from .ops.loss import distill_loss
from .projector import LELPProjector


class LELPLoss(nn.Module):
    """``L = τ² · D(t, softmax(s/τ)) + α · CE(y, logsumexp-pool(s))`` (docs/algorithm.md).

    Offline: pass precomputed log-targets (``projector.targets(...)``). Online: build the loss
    with a fitted ``projector`` and pass teacher ``embeddings`` (and optionally
    ``teacher_logits``); the targets are computed on the fly, without gradient. Several
    teachers online: build it with a list of M projectors (same C and S) and pass lists of M
    embeddings (and teacher logits) with ``teacher_weights`` (N, M); each teacher's targets are
    computed and mixed inside the kernel.

    Args:
        projector: fitted projector for the online mode (gives C and S too), or a list of them.
        num_classes, n_subclasses: C and S for the offline mode without a projector.
        divergence: "kl" (KL(t‖q), default), "reverse_kl", "js" or its alias "jsd" (the generalised JSD with
            ``jsd_beta``),
            "tvd" or "mse" (squared error of the centred logits s/τ and log t).
        jsd_beta: the generalised JSD's β (Liger-Kernel, TRL): 0 forward KL, 1 reverse KL, 0.5 (default) JS.
        tau: class temperature τ (also used for the targets online); default the projector's or 1.
        beta: subclass temperature β online; default the projector's.
        alpha: weight of the hard-label cross-entropy on pooled class logits (paper: 0).
        reduction: "mean" (over kept rows), "sum" or "none".
        ignore_index: rows whose label equals it contribute nothing.
        subclass_weight: λ, the weight of the subclass part of KL(t‖q) (0: KD on the pooled student,
            1: the paper's LELP; KL only). Default (None): ``reference.DEFAULT_SUBCLASS_WEIGHT`` (0.1)
            with KL, 1 with another divergence; docs/results.md has the evidence. λ ≠ 1 is one pass
            of the CPU or CUDA kernel, and of the Triton kernel for 2 to 16 classes; otherwise, on
            Triton, mixed or online targets are computed in torch first, then two fused calls
            (``ops.loss.subclass_weighted_loss``). No effect at S = 1.
        backend: "auto" (fused kernel for the tensor's device, else torch), "torch", "cpu", "cuda".
        check_inputs: on CPU in eager mode, refuse NaN/Inf logits, embeddings and weights and
            log-targets that are not log-probabilities, naming the row (default). The CPU kernel flags
            the logits' and log-targets' rows in its own pass; ``False`` skips the rest (NaN then
            propagates to the loss). See :func:`lelp_fast.ops.distill_loss`.
    """

    def __init__(
        self,
        projector: Union[LELPProjector, Sequence[LELPProjector], None] = None,
        *,
        num_classes: Optional[int] = None,
        n_subclasses: Optional[int] = None,
        divergence: str = "kl",
        jsd_beta: float = 0.5,
        tau: Optional[float] = None,
        beta: Optional[float] = None,
        alpha: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
        subclass_weight: Optional[float] = None,
        check_inputs: bool = True,
    ):
        super().__init__()
        divergence = reference.canonical_divergence(divergence)  # "jsd" (TRL's and Liger's name) is "js"
        check_choice("backend", backend, _dispatch.BACKENDS)  # now, not at the first call
        check_nonnegative("alpha", alpha)
        for name, value in (("num_classes", num_classes), ("n_subclasses", n_subclasses)):
            if value is not None:
                check_count(name, value)
        check_choice("reduction", reduction, reference.REDUCTIONS)
        projectors = [] if projector is None else [projector] if isinstance(projector, LELPProjector) else list(projector)
        for i, p in enumerate(projectors):
            p._require_fitted()
            first = projectors[0]
            if (p.num_classes, p.n_subclasses) != (first.num_classes, first.n_subclasses):
                raise ValueError(f"projector[{i}] has C={p.num_classes}, S={p.n_subclasses}; "
                                 f"projector[0] has C={first.num_classes}, S={first.n_subclasses}")
        if projectors:
            first = projectors[0]
            if (num_classes not in (None, first.num_classes)) or (n_subclasses not in (None, first.n_subclasses)):
                raise ValueError(f"num_classes={num_classes}, n_subclasses={n_subclasses}, but the projector has "
                                 f"C={first.num_classes}, S={first.n_subclasses}; drop num_classes/n_subclasses or "
                                 "pass those")
            num_classes, n_subclasses = first.num_classes, first.n_subclasses
            tau = first.tau if tau is None else tau
        if num_classes is None or n_subclasses is None:
            raise ValueError("pass a fitted projector, or num_classes and n_subclasses")
        tau = 1.0 if tau is None else tau
        check_positive("tau", tau)
        if beta is not None:
            check_positive("beta", beta)
        self.projector = projector
        self.projectors = projectors
        self.num_classes = int(num_classes)
        self.n_subclasses = int(n_subclasses)
        self.divergence = divergence
        if not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must lie in [0, 1] (0: forward KL, 1: reverse KL), got {jsd_beta!r}")
        self.jsd_beta = float(jsd_beta)
        self.tau = float(tau)
        self.beta = beta
        self.alpha = float(alpha)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend
        self.subclass_weight = reference.resolve_subclass_weight(subclass_weight, divergence)
        if self.n_subclasses > 1:  # at S = 1 there is no subclass part: λ has no effect
            reference.require_kl_for_subclass_weight(self.subclass_weight, divergence)
        self.check_inputs = bool(check_inputs)

    def forward(
        self,
        student_logits: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        embeddings: Optional[torch.Tensor] = None,
        teacher_logits: Optional[torch.Tensor] = None,
        teacher_weights: Optional[torch.Tensor] = None,
        return_components: bool = False,
    ):
        """Args:
        student_logits: (N, C*S) student outputs.
        targets: (N, C*S) log-targets (offline mode), or (N, M, C*S) for M teachers.
        labels: (N,) class labels, for α ≠ 0 and ``ignore_index``.
        embeddings: (N, d) teacher embeddings (online mode: targets computed in the kernel), or a
            list of M (N, d_m) for a loss built with M projectors.
        teacher_logits: (N, C) teacher logits (online mode, optional with a stored head); a list of
            M (entries may be None) with M projectors.
        teacher_weights: (N, M) per-row teacher weights (rows sum to 1) for M teachers.
        return_components: return ``(loss, soft, hard)``: the loss and, detached for logging, its
            τ²·D and α·CE parts, reduced the same way and taken from the same kernel pass.
        """
        online = {}
        if targets is None:
            if embeddings is None or not self.projectors:
                raise ValueError("pass targets (offline), or embeddings with a projector-built loss (online)")
            online = self._online_arguments(embeddings, teacher_logits)
        elif embeddings is not None:
            raise ValueError("pass either targets or embeddings, not both")
        elif targets.shape[0] != student_logits.shape[0] or targets.shape[-1] != student_logits.shape[-1]:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} does not match student_logits {tuple(student_logits.shape)}"
            )
        return distill_loss(
            student_logits,
            None if targets is None else targets.to(student_logits.device),
            labels,
            num_classes=self.num_classes,
            n_subclasses=self.n_subclasses,
            divergence=self.divergence,
            jsd_beta=self.jsd_beta,
            tau=self.tau,
            alpha=self.alpha,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            teacher_weights=teacher_weights,
            backend=self.backend,
            check_inputs=self.check_inputs,
            return_components=return_components,
            subclass_weight=self.subclass_weight,
            **online,
        )

    def class_logits(self, student_logits: torch.Tensor) -> torch.Tensor:
        """Class logits for inference, pooled at this loss's τ (the distribution it trains)."""
        return reference.class_logits(student_logits, self.num_classes, self.n_subclasses, self.tau)

    def _online_arguments(self, embeddings, teacher_logits) -> dict:
        """distill_loss's online arguments, one list entry per projector."""
        m, several = len(self.projectors), len(self.projectors) > 1
        if several:
            if isinstance(embeddings, torch.Tensor) or len(embeddings) != m:
                raise ValueError(f"embeddings must be a list of {m} tensors, one per projector")
            teacher_logits = [None] * m if teacher_logits is None else list(teacher_logits)
            if len(teacher_logits) != m:
                raise ValueError(f"teacher_logits must be a list of {m} (entries may be None)")
            embeddings = list(embeddings)
        else:
            embeddings, teacher_logits = [embeddings], [teacher_logits]
        weights, biases, betas = [], [], []
        for i, (p, h, z) in enumerate(zip(self.projectors, embeddings, teacher_logits)):
            name = f"embeddings[{i}]" if several else "embeddings"
            if h.ndim != 2 or h.shape[1] != p.dim:
                raise ValueError(f"{name} must have shape (N, {p.dim}), got {tuple(h.shape)}")
            w, b = p.fused_map(with_head=z is None)
            weights.append(on_device(w, h.device))
            biases.append(on_device(b, h.device))
            betas.append(p.beta if self.beta is None else self.beta)
        return dict(embeddings=embeddings, fused_weight=weights, fused_bias=biases, teacher_logits=teacher_logits,
                    beta=betas)

    def extra_repr(self) -> str:
        return (
            f"C={self.num_classes}, S={self.n_subclasses}, divergence={self.divergence!r}, "
            f"tau={self.tau}, alpha={self.alpha}, reduction={self.reduction!r}"
        )
