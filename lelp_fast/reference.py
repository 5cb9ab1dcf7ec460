"""Pure-PyTorch reference of every LELP op (docs/algorithm.md): readable, fp64-capable.

This module is the ground truth: every fast path (C++, Triton, CUDA) is tested
against it. Nothing here is optimised; each function mirrors one formula.

Notation: embeddings ``h`` (N x d), teacher head ``W`` (C x d) and ``b`` (C,),
``S`` pseudo-subclasses per class, ``K = C * S`` student outputs, class-major
(``k = c * S + s``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_positive

DIVERGENCES = ("kl", "reverse_kl", "js", "tvd", "mse")
# Names other libraries use for the same divergence (TRL's GKD and Liger-Kernel say "jsd").
DIVERGENCE_ALIASES = {"jsd": "js"}
REDUCTIONS = ("mean", "sum", "none")
# Eigenvalues below this fraction of the largest count as zero (the fit accumulates fp32 GEMMs).
RANK_TOLERANCE = 1e-6


# ----------------------------------------------------------------------------- fit


def null_space_projector(head_weight: torch.Tensor) -> torch.Tensor:
    """``Π = I − Wᵀ (W Wᵀ)⁺ W`` (d x d, fp64): removes the directions the teacher head reads."""
    w = head_weight.to(torch.float64)
    d = w.shape[1]
    return torch.eye(d, dtype=torch.float64, device=w.device) - w.T @ torch.linalg.pinv(w @ w.T) @ w


def haar_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random ``size x size`` orthogonal matrix (fp64): QR of a Gaussian with the sign fix."""
    g = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def top_eigenvectors(cov: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of a symmetric matrix, descending, each vector's largest entry positive.

    The sign convention makes the fit deterministic across backends and BLAS builds.
    """
    evals, evecs = torch.linalg.eigh(cov.to(torch.float64))
    return evals.flip(0)[:k], fix_signs(evecs.flip(1)[:, :k])


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flips each column so that its largest-magnitude entry is positive (a deterministic basis)."""
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def class_rotations(num_classes: int, size: int, seed: int) -> torch.Tensor:
    """One seeded Haar rotation per class, ``(C, S, S)`` fp64, drawn in class order."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([haar_orthogonal(size, gen) for _ in range(num_classes)])


def class_subspaces(
    covariances: torch.Tensor,
    n_subclasses: int,
    *,
    rotate: bool = True,
    standardize: bool = True,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class directions ``V'_c`` (C x d x S), scales ``σ`` (C x S) and top eigenvalues (C x S).

    ``V'_c = V_c Q_c`` with ``Q_c`` Haar-random when ``rotate``; ``σ_{c,s} = sqrt(v'ᵀ Σ_c v')``
    when ``standardize`` (else 1).
    """
    pairs = [top_eigenvectors(cov, n_subclasses) for cov in covariances]
    evals = torch.stack([p[0] for p in pairs])
    evecs = torch.stack([p[1] for p in pairs])
    directions, scales = subspaces_from_eigenpairs(evals, evecs, rotate=rotate, standardize=standardize, seed=seed)
    return directions, scales, evals


def subspaces_from_eigenpairs(
    evals: torch.Tensor,
    evecs: torch.Tensor,
    *,
    rotate: bool = True,
    standardize: bool = True,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotated directions (C x d x S) and scales (C x S) from each class's top-S eigenpairs.

    With ``v' = V Q`` and ``V`` eigenvectors, ``v'ᵀ Σ v' = Σ_i λ_i Q_is²``: the scales need only
    the eigenvalues, so the exact and the sketched fit share this step.
    """
    num_classes, _, s = evecs.shape
    for c in range(num_classes):
        # Below 1e-6 of the largest, an eigenvalue is fp32 accumulation noise, not a direction.
        if not float(evals[c, -1]) > RANK_TOLERANCE * max(float(evals[c, 0]), 1e-300):
            raise ValueError(
                f"class {c}: its embeddings span fewer than n_subclasses={s} directions "
                "(a zero eigenvalue among the top S); lower n_subclasses or add rows to the class"
            )
    if rotate:
        q = class_rotations(num_classes, s, seed)
        directions = evecs.to(torch.float64) @ q
        variances = torch.einsum("ci,cis->cs", evals.to(torch.float64), q * q)
    else:
        directions = evecs.to(torch.float64)
        variances = evals.to(torch.float64)
    scales = variances.sqrt() if standardize else torch.ones_like(variances)
    return directions, scales


def compile_affine(
    directions: torch.Tensor, scales: torch.Tensor, means: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The affine map ``u = h A + e`` (A: d x K, e: K) of ``u_{c,s} = v'·(Π h − μ_c) / σ``.

    ``v'`` lies in range(Π) and Π is symmetric, so ``v'·Π h = v'·h``: the projector folds into A.
    """
    num_classes, d, s = directions.shape
    a = (directions / scales.unsqueeze(1)).permute(1, 0, 2).reshape(d, num_classes * s)
    e = -(torch.einsum("cds,cd->cs", directions, means) / scales).reshape(num_classes * s)
    return a, e


def class_moments(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-memory per-class counts, means and unbiased covariances (fp64), two passes."""
    h = embeddings.to(torch.float64)
    d = h.shape[1]
    counts = torch.zeros(num_classes, dtype=torch.int64)
    means = torch.zeros(num_classes, d, dtype=torch.float64)
    covs = torch.zeros(num_classes, d, d, dtype=torch.float64)
    for c in range(num_classes):
        hc = h[labels == c]
        counts[c] = hc.shape[0]
        if hc.shape[0] == 0:
            continue
        means[c] = hc.mean(0)
        centred = hc - means[c]
        covs[c] = centred.T @ centred / max(hc.shape[0] - 1, 1)
    return counts, means, covs


def fit_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    n_subclasses: int,
    *,
    head_weight: Optional[torch.Tensor] = None,
    null_space: bool = True,
    rotate: bool = True,
    standardize: bool = True,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """In-memory LELP fit (docs/algorithm.md, fit steps 1-5), returning the affine map ``(A, e)`` in fp64."""
    h = embeddings.to(torch.float64)
    if head_weight is not None and null_space:
        h = h @ null_space_projector(head_weight)  # Π is symmetric
    _, means, covs = class_moments(h, labels, num_classes)
    directions, scales, _ = class_subspaces(
        covs, n_subclasses, rotate=rotate, standardize=standardize, seed=seed
    )
    return compile_affine(directions, scales, means)


# ------------------------------------------------------------------------- targets


def log_targets(
    u: torch.Tensor, teacher_logits: torch.Tensor, n_subclasses: int, beta: float = 1.0, tau: float = 1.0
) -> torch.Tensor:
    """``log t_{c,s} = log_softmax(z/τ)_c + log_softmax_s(u_{c,·}/β)_s``, shape (N, C*S).

    Subclass probabilities of class c sum to the teacher's class probability; S = 1 gives
    exactly the vanilla KD targets ``log_softmax(z/τ)``.

    z and each class's u are shifted by their max before the division by τ or β, as the compiled
    kernels do (the same math; the shift is detached, a log-softmax does not depend on it). It
    matters to the fp32 callers (the torch backend, compact stores, the tuner): a finite z whose
    z/τ overflows then gives its targets, not NaN, and at u/β of 1e6 (β = 1e-6) the subclass
    log-softmax is not that of u/β rounded to 0.06 (0.019 off the fp64 targets until session 61).
    """
    n, num_classes = teacher_logits.shape
    u = u.reshape(n, num_classes, n_subclasses)
    log_class = F.log_softmax((teacher_logits - _max_or_zero(teacher_logits, -1)) / tau, dim=-1)
    log_sub = F.log_softmax((u - _max_or_zero(u, -1)) / beta, dim=-1)
    return (log_class.unsqueeze(-1) + log_sub).reshape(n, num_classes * n_subclasses)


def _scaling_shift(x: torch.Tensor, tau: float):
    """(x with all -inf slices of the last axis set to 0, their mask, the shift taken off x before it
    is divided by τ), as the compiled losses take it (``scaled_gap`` in lelp/row_math.h): at τ < 1
    x's max (detached), since x/τ can overflow where x does not (x = 1.8e38 at τ = 0.5); at τ >= 1
    nothing, since x/τ cannot, but x - max can (a row spanning more than FLT_MAX). The all -inf
    slices (a class of -inf logits) give -inf and no NaN gradient."""
    empty = (x == float("-inf")).all(dim=-1, keepdim=True)
    x = x.masked_fill(empty, 0.0)
    return x, empty, (0.0 if tau >= 1.0 else _max_or_zero(x, -1))


def scaled_log_softmax(x: torch.Tensor, tau: float) -> torch.Tensor:
    """The student's ``log_softmax(x/τ)`` over the last axis (shifted as ``_scaling_shift`` says)."""
    x, empty, shift = _scaling_shift(x, tau)
    return F.log_softmax((x - shift) / tau, dim=-1).masked_fill(empty, float("-inf"))


def _max_or_zero(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x's max over ``dim`` (kept, detached), 0 where every entry is -inf (such a slice stays -inf)."""
    m = x.amax(dim=dim, keepdim=True).detach()
    return m.masked_fill(m == float("-inf"), 0.0)


def mix_log_targets(log_targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multi-teacher targets ``log Σ_m w_m t_m`` from (N, M, K) log-targets and (N, M) weights."""
    return torch.logsumexp(torch.log(weights).unsqueeze(-1) + log_targets, dim=1)


# ---------------------------------------------------------------------------- loss


def class_logits(student_logits: torch.Tensor, num_classes: int, n_subclasses: int, tau: float = 1.0) -> torch.Tensor:
    """Inference: class logit = ``τ · logsumexp(s/τ)`` over the class's S subclass logits (class-major).

    The loss trains ``softmax(s/τ)``, whose class marginals are ``softmax(logsumexp(s/τ))``: pooling
    at the loss's τ keeps the prediction the distribution that was trained (plain ``logsumexp(s)``,
    τ = 1, can pick another class at τ = 4), and the factor τ keeps the scale of the teacher's
    logits for the fidelity metrics.
    """
    check_positive("tau", tau)  # at τ < 0 the pooling is a soft minimum
    if student_logits.shape[-1] != num_classes * n_subclasses:
        raise ValueError(f"student_logits have {student_logits.shape[-1]} outputs, but num_classes={num_classes} x "
                         f"n_subclasses={n_subclasses} = {num_classes * n_subclasses}; pass the C and S the student "
                         "was trained with")
    shape = student_logits.shape[:-1]
    grouped, empty, shift = _scaling_shift(student_logits.reshape(*shape, num_classes, n_subclasses), tau)
    pooled = shift + tau * torch.logsumexp((grouped - shift) / tau, dim=-1, keepdim=True)
    return pooled.masked_fill(empty, float("-inf")).squeeze(-1)


def canonical_divergence(name: str, argument: str = "divergence") -> str:
    """``name`` with aliases resolved (``"jsd"`` -> ``"js"``); an unknown name is an error naming ``argument``."""
    name = DIVERGENCE_ALIASES.get(name, name)
    if name not in DIVERGENCES:
        raise ValueError(f"{argument} must be one of {DIVERGENCES} (or an alias: "
                         f"{', '.join(f'{a!r} = {c!r}' for a, c in DIVERGENCE_ALIASES.items())}), got {name!r}")
    return name


DEFAULT_SUBCLASS_WEIGHT = 0.1
"""λ, the weight of the subclass part of ``KL(t‖q) = KL(p‖Q) + Σ_c p_c KL(r_c‖ρ_c)``, when none is
given: ``LELPLoss``, ``TrainSettings``, the run config's ``train.subclass_weight`` and ``lelp-fast
tune`` (``ops.distill_loss``, the formula, takes λ = 1 unless told). λ = 1 is the paper's LELP and
was the default until issue 22: over the 22 real-data cells measured, λ = 0.1 was never below tuned
KD beyond the paired noise and was above λ = 1 in 20 (below it beyond noise in one: an MLP on 1 %
of Fashion-MNIST parity; docs/results.md, "The subclass weight λ").
Only KL splits into a class and a subclass part, so with another divergence the default is 1 (the
whole targets): see :func:`resolve_subclass_weight`."""


def resolve_subclass_weight(subclass_weight, divergence: str = "kl") -> float:
    """λ itself, or for ``None`` the library's default: :data:`DEFAULT_SUBCLASS_WEIGHT` with KL, 1 with
    any other divergence (which has no class/subclass split to weight)."""
    if subclass_weight is None:
        return DEFAULT_SUBCLASS_WEIGHT if canonical_divergence(divergence) == "kl" else 1.0
    if not float(subclass_weight) >= 0.0:
        raise ValueError(f"subclass_weight must be >= 0 (0: KD, 1: LELP), got {subclass_weight!r}")
    return float(subclass_weight)


def require_kl_for_subclass_weight(subclass_weight, divergence: str, config_key: Optional[str] = None) -> None:
    """λ other than 1 (None: the default, which follows the divergence) weights a split only KL has,
    ``KL(t‖q) = KL(p‖Q) + Σ_c p_c KL(r_c‖ρ_c)``: with another divergence it is an error, naming the
    config keys when ``config_key`` is given."""
    if subclass_weight is None or float(subclass_weight) == 1.0 or canonical_divergence(divergence) == "kl":
        return
    if config_key:
        raise ValueError(f"{config_key} = {subclass_weight} needs train.divergence: kl (only KL splits into a class "
                         f"and a subclass part); leave it unset (null) or set 1")
    raise ValueError(f"subclass_weight needs divergence='kl' (the split into class and subclass KL is exact only "
                     f"for KL), got divergence={divergence!r}")


def _plogp_ratio(p: torch.Tensor, log_p: torch.Tensor, log_x: torch.Tensor) -> torch.Tensor:
    """``p · (log p − log x)`` with the convention ``0 · log 0 = 0`` (targets may underflow to 0);
    a NaN ``p`` stays NaN. The logs are zeroed where p = 0 before the product too: a -inf there (a
    masked logit in reverse KL's or JS's p = q) gave 0 · inf = NaN in the untaken branch's gradient,
    and so a NaN gradient for the whole row."""
    zero = p == 0
    return torch.where(zero, torch.zeros_like(p),
                       p * (log_p.masked_fill(zero, 0.0) - log_x.masked_fill(zero, 0.0)))


def divergence(log_t: torch.Tensor, log_q: torch.Tensor, kind: str = "kl", jsd_beta: float = 0.5) -> torch.Tensor:
    """Per-row f-divergence between targets t and student q, both given as log-probabilities.

    Computed in log space so huge logits and tiny β give no NaN; a probability that underflows to
    exactly 0 contributes 0 (``0 · log 0 = 0``), as in the kernels.
    """
    kind = canonical_divergence(kind)
    t, q = log_t.exp(), log_q.exp()
    if kind == "kl":
        return _plogp_ratio(t, log_t, log_q).sum(-1)
    if kind == "reverse_kl":
        return _plogp_ratio(q, log_q, log_t).sum(-1)
    if kind == "js":  # generalised JSD (GKD, TRL): b = 0 forward KL, 1 reverse KL, 1/2 the JS divergence
        if jsd_beta == 0.0:
            return _plogp_ratio(t, log_t, log_q).sum(-1)
        if jsd_beta == 1.0:
            return _plogp_ratio(q, log_q, log_t).sum(-1)
        log_m = torch.logaddexp(log_t + math.log(jsd_beta), log_q + math.log(1.0 - jsd_beta))
        return (jsd_beta * _plogp_ratio(t, log_t, log_m).sum(-1)
                + (1.0 - jsd_beta) * _plogp_ratio(q, log_q, log_m).sum(-1))
    if kind == "tvd":
        return 0.5 * (t - q).abs().sum(-1)
    if kind == "mse":  # on centred logits: log q is s/τ minus a per-row constant, which the centring removes
        e = (log_q - log_q.mean(-1, keepdim=True)) - (log_t - log_t.mean(-1, keepdim=True))
        return (e * e).mean(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")


def subclass_weighted_kl(
    student_logits: torch.Tensor,
    log_targets_: torch.Tensor,
    num_classes: int,
    n_subclasses: int,
    tau: float = 1.0,
    subclass_weight: float = 1.0,
) -> torch.Tensor:
    """Per row ``τ² · [KL(p‖Q) + λ · Σ_c p_c · KL(r_c‖ρ_c)]``, written from its two parts.

    With ``t_{c,s} = p_c r_{s|c}`` and ``q_{c,s} = Q_c ρ_{s|c}`` (class marginals p, Q; within-class
    splits r, ρ), ``KL(t‖q)`` is exactly the class KL plus the class-weighted subclass KL; ``λ``
    (``subclass_weight``) weights the second: 0 is vanilla KD on the pooled student, 1 is LELP.
    """
    shape = (*student_logits.shape[:-1], num_classes, n_subclasses)
    # Q and ρ from each class's own max, not from log q: a class far below the row's max (its log q
    # all about -1e6 in fp32, -1e38 in fp64) keeps the differences within it.
    log_rho = scaled_log_softmax(student_logits.reshape(shape), tau)
    log_big_q = scaled_log_softmax(class_logits(student_logits, num_classes, n_subclasses, tau), tau)
    log_t = log_targets_.reshape(shape)
    log_p = torch.logsumexp(log_t, -1)
    p = log_p.exp()
    class_kl = _plogp_ratio(p, log_p, log_big_q).sum(-1)
    log_r = log_t - log_p.unsqueeze(-1)
    r = torch.where(p.unsqueeze(-1) == 0, torch.zeros_like(log_r), log_r.exp())  # an empty class has no split
    sub_kl = _plogp_ratio(r, torch.where(r == 0, torch.zeros_like(log_r), log_r), log_rho).sum(-1)
    return tau * tau * (class_kl + subclass_weight * (p * sub_kl).sum(-1))


def distillation_loss(
    student_logits: torch.Tensor,
    log_targets_: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    num_classes: int,
    n_subclasses: int,
    divergence_kind: str = "kl",
    jsd_beta: float = 0.5,
    tau: float = 1.0,
    alpha: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """``L = τ² · D(t, softmax(s/τ)) + α · CE(y, logsumexp-pool(s))`` per row, then reduced.

    Rows whose label equals ``ignore_index`` contribute zero and are left out of the mean; when
    every row is ignored the mean is 0. ``mean`` divides by the number of kept rows (batchmean).
    """
    log_q = scaled_log_softmax(student_logits, tau)
    per_row = tau * tau * divergence(log_targets_, log_q, divergence_kind, jsd_beta)
    if labels is not None:
        keep = labels != ignore_index
        if alpha != 0.0:
            per_row = per_row + alpha * hard_label_rows(student_logits, labels, num_classes, n_subclasses,
                                                        ignore_index)
        per_row = torch.where(keep, per_row, torch.zeros_like(per_row))
    elif alpha != 0.0:
        raise ValueError("labels are required when alpha != 0 (the hard-label term needs them)")
    return reduce_rows(per_row, labels, ignore_index, reduction)


def hard_label_rows(student_logits: torch.Tensor, labels: torch.Tensor, num_classes: int, n_subclasses: int,
                    ignore_index: int = -100) -> torch.Tensor:
    """Per row ``CE(y, logsumexp-pool(s))``, 0 for rows labelled ``ignore_index``."""
    keep = labels != ignore_index
    pooled = class_logits(student_logits, num_classes, n_subclasses)
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels))
    ce = F.cross_entropy(pooled, safe_labels, reduction="none")
    return torch.where(keep, ce, torch.zeros_like(ce))


def reduce_rows(
    per_row: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, reduction: str
) -> torch.Tensor:
    """``none``, ``sum``, or ``mean`` over the rows whose label is not ``ignore_index`` (0 if none)."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        if labels is None:  # the row count, a host number: a device tensor of it was a copy and a sync a call
            return per_row.sum() / max(per_row.shape[0], 1)
        count = (labels != ignore_index).sum()
        return per_row.sum() / count.clamp(min=1).to(per_row.dtype)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
