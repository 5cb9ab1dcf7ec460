"""LELP variants evaluated for issue 22 (item 3): none is a default.

Each changes one thing about the default targets ``log t = log_softmax(z/τ)_c + log_softmax_s(u_c/β)``
and plugs into the same loss; docs/results.md ("LELP variants") has the evidence. Each is fitted in
fp64 and computed two ways: directly in fp64 torch (``log_targets``, the reference) and as an affine
map ``u = h W + b`` with a β per step (:class:`SubclassMap`), which the library's targets op runs on
every backend the default uses (torch, the CPU kernel, CUDA, Triton).

- :class:`SpectralSubclasses`: per-class S, the number of principal directions of the class's
  null-space-projected embeddings that explain a share of its variance (capped); the student keeps
  ``S_max`` outputs per class and a class's unused ones get target 0 (``u = −inf``).
- :class:`GMMSubclasses`: a Gaussian mixture (scikit-learn) in each class's whitened top principal
  coordinates; ``u`` is the log posterior of each component, so β = 1 gives the soft assignment. With
  one covariance shared by the components (``tied``, the variant) the log posteriors are affine in h;
  a full-covariance mixture's are quadratic and run in fp64 torch only.
- :func:`entropy_matched_betas`: β per class, chosen by bisection so that the mean normalised
  entropy of the class's subclass split over its own rows hits a target.
- :func:`annealed_beta`: β over training, geometric from a large β (a nearly flat split) down to β.
- :func:`both_signs_map`: 2S subclasses from S directions, each direction's two halves (u and −u).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .. import reference
from .subclasses import _check_fit_inputs


class SubclassMap:
    """Subclass coordinates as the affine map the library's targets op takes: ``u = h @ weight + bias``,
    (d, C·S) and (C·S,) in fp64; a column with a −inf bias is a subclass whose target is 0."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, n_subclasses: int):
        self.weight, self.bias, self.n_subclasses = weight.double(), bias.double(), n_subclasses
        self.num_classes = weight.shape[1] // n_subclasses
        self._fp32 = {}  # device -> (weight, bias) in fp32: one copy per device, not one per step

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return h.double() @ self.weight + self.bias

    def targets(self, h: torch.Tensor, teacher_logits: torch.Tensor, beta: float, tau: float = 1.0,
                backend: str = "auto", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Log targets from the library's targets op (``backend`` as in :func:`lelp_fast.ops.lelp_targets`)."""
        from ..ops import lelp_targets

        if h.device not in self._fp32:  # the same tensors each step also keep the CUDA tile's split cached
            self._fp32[h.device] = (self.weight.float().to(h.device), self.bias.float().to(h.device))
        weight, bias = self._fp32[h.device]
        return lelp_targets(h, weight, bias, self.num_classes, self.n_subclasses, teacher_logits=teacher_logits,
                            beta=beta, tau=tau, backend=backend, out_dtype=out_dtype)


def _null_space_embeddings(h: torch.Tensor, head_weight: Optional[torch.Tensor]) -> torch.Tensor:
    h = h.double()
    return h if head_weight is None else h @ reference.null_space_projector(head_weight)


def spectral_subclass_counts(eigenvalues: torch.Tensor, share: float, max_subclasses: int,
                             rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per class (rows of ``eigenvalues``, descending), the fewest leading directions whose variance
    reaches ``share`` of the class's total, clipped to [1, max_subclasses] and to rows − 1 (a class of
    n rows spans at most n − 1 directions)."""
    ev = eigenvalues.double().clamp(min=0)
    cumulative = ev.cumsum(1) / ev.sum(1, keepdim=True).clamp(min=1e-300)
    counts = (cumulative < share - 1e-12).sum(1) + 1
    cap = torch.full_like(counts, max_subclasses)
    if rows is not None:
        cap = torch.minimum(cap, (rows.to(counts.dtype) - 1).clamp(min=1))
    return torch.minimum(counts, cap).clamp(min=1)


class SpectralSubclasses:
    """LELP's fit (null space, top directions, Haar rotation, standardisation) with S_c directions for
    class c from :func:`spectral_subclass_counts`; ``project`` gives (N, C·max_subclasses) with −inf in a
    class's columns past its S_c, so those subclasses get target probability 0."""

    def __init__(self, max_subclasses: int, share: float = 0.8, seed: int = 0):
        self.max_subclasses, self.share, self.seed = max_subclasses, share, seed

    def fit(self, h: torch.Tensor, labels: torch.Tensor, num_classes: int,
            head_weight: Optional[torch.Tensor] = None) -> "SpectralSubclasses":
        _check_fit_inputs(h, labels, num_classes, 2)
        h = _null_space_embeddings(h, head_weight)
        counts, means, covs = reference.class_moments(h, labels, num_classes)
        evals, evecs = torch.linalg.eigh(covs)  # ascending, per class
        evals, evecs = evals.flip(-1), evecs.flip(-1)
        self.subclass_counts = spectral_subclass_counts(evals, self.share, self.max_subclasses, counts)
        gen = torch.Generator().manual_seed(int(self.seed))
        self.maps = []
        for c in range(num_classes):
            s = int(self.subclass_counts[c])
            v = reference.fix_signs(evecs[c, :, :s]) @ reference.haar_orthogonal(s, gen)
            scale = (v * (covs[c] @ v)).sum(0).sqrt()  # σ = sqrt(v'ᵀ Σ v'), as LELP standardises
            self.maps.append((v / scale, means[c]))
        return self

    def project(self, h: torch.Tensor) -> torch.Tensor:
        h = h.double()
        cols = []
        for a, mean in self.maps:
            u = (h - mean) @ a  # v'ᵀ(Π h − μ) = v'ᵀ(h − μ): v' lies in range(Π), μ is already projected
            pad = torch.full((h.shape[0], self.max_subclasses - a.shape[1]), -math.inf, dtype=h.dtype)
            cols += [u, pad]
        return torch.cat(cols, 1)

    def subclass_map(self) -> SubclassMap:
        """The same coordinates as one affine map: a class's columns past its S_c have weight 0, bias −inf."""
        weights, biases = [], []
        for a, mean in self.maps:
            pad = self.max_subclasses - a.shape[1]
            weights += [a, a.new_zeros(a.shape[0], pad)]
            biases += [-(mean @ a), torch.full((pad,), -math.inf, dtype=a.dtype)]
        return SubclassMap(torch.cat(weights, 1), torch.cat(biases), self.max_subclasses)


def gmm_log_posteriors(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
                       covariances: torch.Tensor) -> torch.Tensor:
    """``log p(s | x)`` of a Gaussian mixture, fp64: (N, S) from x (N, P), weights (S,), means (S, P),
    covariances (S, P, P) (a tied mixture's repeated)."""
    x = x.double()
    dist = torch.distributions.MultivariateNormal(means.double(), covariance_matrix=covariances.double())
    joint = dist.log_prob(x.unsqueeze(1)) + weights.double().log()
    return joint - torch.logsumexp(joint, 1, keepdim=True)


class GMMSubclasses:
    """Per class, a ``n_subclasses``-component Gaussian mixture (scikit-learn, seeded) on the class's rows
    in its top ``dims`` principal coordinates of the null-space-projected embeddings, whitened;
    ``project`` gives each class's log posteriors (use β = 1 for the posterior). ``covariance``:
    "tied" (one covariance for the components: log posteriors affine in h, see :meth:`subclass_map`)
    or "full" (quadratic in h: fp64 torch only)."""

    def __init__(self, n_subclasses: int, dims: Optional[int] = None, seed: int = 0, covariance: str = "tied"):
        if covariance not in ("tied", "full"):
            raise ValueError(f"covariance must be 'tied' or 'full', got {covariance!r}")
        self.n_subclasses, self.dims, self.seed = n_subclasses, dims or n_subclasses, seed
        self.covariance = covariance

    def fit(self, h: torch.Tensor, labels: torch.Tensor, num_classes: int,
            head_weight: Optional[torch.Tensor] = None) -> "GMMSubclasses":
        from sklearn.mixture import GaussianMixture

        _check_fit_inputs(h, labels, num_classes, max(self.n_subclasses, self.dims + 1))
        h = _null_space_embeddings(h, head_weight)
        _, means, covs = reference.class_moments(h, labels, num_classes)
        self.coords, self.mixtures = [], []
        for c in range(num_classes):
            evals, evecs = reference.top_eigenvectors(covs[c], self.dims)
            whiten = (evecs / evals.sqrt(), means[c])
            x = ((h[labels == c] - means[c]) @ whiten[0]).numpy()
            gmm = GaussianMixture(self.n_subclasses, covariance_type=self.covariance,
                                  random_state=self.seed + c).fit(x)
            weights, centres, covariances = (torch.from_numpy(np.asarray(a, dtype=np.float64))
                                             for a in (gmm.weights_, gmm.means_, gmm.covariances_))
            if self.covariance == "tied":  # (P, P): the same for every component
                covariances = covariances.expand(self.n_subclasses, -1, -1)
            self.coords.append(whiten)
            self.mixtures.append((weights, centres, covariances))
        return self

    def project(self, h: torch.Tensor) -> torch.Tensor:
        h = h.double()
        return torch.cat([gmm_log_posteriors((h - mean) @ a, *mix)
                          for (a, mean), mix in zip(self.coords, self.mixtures)], 1)

    def subclass_map(self) -> SubclassMap:
        """A tied mixture's log posteriors up to a per-row constant (which the split's softmax removes):
        ``x Σ⁻¹ μ_s − ½ μ_s Σ⁻¹ μ_s + log π_s`` with x = (h − m) W, the whitened coordinates."""
        if self.covariance != "tied":
            raise ValueError("a full-covariance mixture's log posteriors are quadratic in the embeddings, so no "
                             "affine map gives them: use covariance='tied'")
        weights, biases = [], []
        for (a, mean), (pi, centres, covariances) in zip(self.coords, self.mixtures):
            slopes = torch.linalg.solve(covariances[0], centres.T)  # (P, S): Σ⁻¹ μ_s, Σ symmetric
            weights.append(a @ slopes)
            biases.append(-(mean @ a) @ slopes - 0.5 * (centres.T * slopes).sum(0) + pi.log())
        return SubclassMap(torch.cat(weights, 1), torch.cat(biases), self.n_subclasses)


def split_entropy(u: torch.Tensor, n_subclasses: int, beta: float) -> torch.Tensor:
    """Per row and class, the entropy of ``softmax(u_c/β)`` over its maximum log S: (N, C)."""
    log_r = torch.log_softmax(u.double().reshape(u.shape[0], -1, n_subclasses) / beta, -1)
    return -(log_r.exp() * log_r).sum(-1) / math.log(n_subclasses)


def entropy_matched_betas(u: torch.Tensor, labels: torch.Tensor, num_classes: int, n_subclasses: int,
                          target: float, lo: float = 1e-3, hi: float = 1e3, iterations: int = 60) -> torch.Tensor:
    """β_c (C,) such that the mean of :func:`split_entropy` over class c's own rows is ``target``,
    by bisection on log β (the entropy rises with β); clipped to [lo, hi]."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must lie in (0, 1) (a share of the maximum entropy log S), got {target!r}")
    betas = torch.empty(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        uc = u[labels == c].double().reshape(-1, num_classes, n_subclasses)[:, c]
        a, b = math.log(lo), math.log(hi)
        for _ in range(iterations):
            mid = 0.5 * (a + b)
            if float(split_entropy(uc, n_subclasses, math.exp(mid)).mean()) < target:
                a = mid
            else:
                b = mid
        betas[c] = math.exp(0.5 * (a + b))
    return betas


def per_class_beta_log_targets(u: torch.Tensor, teacher_logits: torch.Tensor, n_subclasses: int,
                               betas: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """The LELP targets with class c's split at temperature ``betas[c]``: ``u_c / β_c`` at β = 1."""
    n, num_classes = teacher_logits.shape
    scaled = u.reshape(n, num_classes, n_subclasses) / betas.to(u.dtype).reshape(1, num_classes, 1)
    return reference.log_targets(scaled.reshape(n, -1), teacher_logits.to(u.dtype), n_subclasses, 1.0, tau)


def annealed_beta(step: int, steps: int, beta: float, start: float = 4.0, fraction: float = 2 / 3) -> float:
    """β at ``step`` of ``steps``: geometric from ``start`` down to ``beta`` over the first ``fraction`` of
    the steps, then ``beta`` (a nearly flat split first, the chosen sharpness by the end)."""
    ramp = max(1, int(fraction * steps))
    progress = min(step, ramp) / ramp
    return float(start * (beta / start) ** progress)


def both_signs_map(projector) -> SubclassMap:
    """2S subclasses from a fitted LELPProjector's S directions: per class, its S coordinates u and then −u."""
    a, e = projector.fused_map(with_head=False)
    c, s = projector.num_classes, projector.n_subclasses
    a, e = a.double().reshape(-1, c, s), e.double().reshape(c, s)
    return SubclassMap(torch.cat([a, -a], -1).reshape(a.shape[0], -1), torch.cat([e, -e], -1).reshape(-1), 2 * s)


def per_class_beta_map(weight: torch.Tensor, bias: torch.Tensor, betas: torch.Tensor) -> SubclassMap:
    """The map whose split at β = 1 is class c's split at ``betas[c]``: class c's columns divided by β_c."""
    num_classes = betas.numel()
    scale = betas.double().repeat_interleave(weight.shape[1] // num_classes)
    return SubclassMap(weight.double() / scale, bias.double() / scale, weight.shape[1] // num_classes)


# -- one entry point for the quality runners ------------------------------------------------------

# "LELP GMM full" (a full-covariance mixture, fp64 torch only) is the GMM of the first variants table in
# docs/results.md; "LELP GMM" is the tied mixture, which every backend runs.
VARIANTS = ("LELP spectral S", "LELP GMM", "LELP entropy β", "LELP annealed β", "LELP GMM full")
SPECTRAL_SHARE = 0.8  # of each class's variance; gives S_c from 1 to 5 on the real tasks (docs/results.md)
ENTROPY_TARGET = 0.35  # the mean, over the real tasks' classes, of the default's split entropy at β = 0.25
ANNEAL_START = 4.0  # β at the first step: a nearly flat split, close to KD on the pooled student


class SubclassVariant:
    """A fitted variant: subclass coordinates (``project``), the outputs per class it needs, its β at each
    training step, and its targets two ways: :meth:`log_targets` (fp64 torch, the reference) and
    :meth:`targets` (the library's targets op on any backend, from :attr:`map`)."""

    def __init__(self, name: str, h: torch.Tensor, labels: torch.Tensor, num_classes: int, n_subclasses: int,
                 head_weight: Optional[torch.Tensor] = None, seed: int = 0):
        if name not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
        self.name, self.n_subclasses, self.betas = name, n_subclasses, None
        if name == "LELP spectral S":
            self.n_subclasses = 2 * n_subclasses  # room for S_c up to twice the default S
            self.coordinates = SpectralSubclasses(self.n_subclasses, SPECTRAL_SHARE, seed).fit(
                h, labels, num_classes, head_weight)
            self.map = self.coordinates.subclass_map()
        elif name in ("LELP GMM", "LELP GMM full"):
            covariance = "full" if name == "LELP GMM full" else "tied"
            self.coordinates = GMMSubclasses(n_subclasses, seed=seed, covariance=covariance).fit(
                h, labels, num_classes, head_weight)
            self.map = self.coordinates.subclass_map() if covariance == "tied" else None
        else:  # the default LELP coordinates (the fp64 reference fit), with another β
            a, e = reference.fit_reference(h, labels, num_classes, n_subclasses, head_weight=head_weight, seed=seed)
            self.coordinates = self.map = SubclassMap(a, e, n_subclasses)
            if name == "LELP entropy β":
                self.betas = entropy_matched_betas(self.project(h), labels, num_classes, n_subclasses, ENTROPY_TARGET)
                self.map = per_class_beta_map(a, e, self.betas)  # at β = 1

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.coordinates.project(h)

    def beta_at(self, step: int, steps: int, beta: float) -> float:
        """The β the targets op takes at ``step`` of ``steps`` (``beta``: the default β the variant starts
        from); 1 where the map carries the split's temperature itself (GMM posteriors, β per class)."""
        if self.name == "LELP annealed β":
            return annealed_beta(step, steps, beta, ANNEAL_START)
        return 1.0 if self.name in ("LELP GMM", "LELP GMM full", "LELP entropy β") else beta

    def log_targets(self, u: torch.Tensor, teacher_logits: torch.Tensor, step: int, steps: int, beta: float,
                    tau: float = 1.0) -> torch.Tensor:
        """The reference: targets (fp32) from ``u = project(h)`` at ``step`` of ``steps``, computed in fp64."""
        u, z = u.double(), teacher_logits.double()
        if self.name == "LELP entropy β":
            out = per_class_beta_log_targets(u, z, self.n_subclasses, self.betas, tau)
        else:
            out = reference.log_targets(u, z, self.n_subclasses, self.beta_at(step, steps, beta), tau)
        return out.float()

    def targets(self, h: torch.Tensor, teacher_logits: torch.Tensor, step: int, steps: int, beta: float,
                tau: float = 1.0, backend: str = "auto") -> torch.Tensor:
        """Targets (fp32) from the embeddings ``h`` by the library's targets op on ``backend``; the
        full-covariance GMM, which has no affine map, takes the reference on "auto" or "torch"."""
        if self.map is None:
            if backend not in ("auto", "torch"):
                raise ValueError(f"backend {backend!r} cannot run {self.name!r} (quadratic in the embeddings): "
                                 "use 'torch'")
            return self.log_targets(self.project(h), teacher_logits, step, steps, beta, tau).to(h.device)
        return self.map.targets(h, teacher_logits, self.beta_at(step, steps, beta), tau, backend)
