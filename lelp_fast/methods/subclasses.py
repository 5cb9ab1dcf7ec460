"""Pseudo-subclass variants from the paper's ablation, as subclass coordinates ``u`` (N x C*S).

Every variant plugs into the same targets, ``log t = log_softmax(z/τ)_c + log_softmax_s(u_c/β)``
(:func:`subclass_log_targets`), so only the way the classes are split changes:

- PCA with or without rotation / null space: :class:`~lelp_fast.LELPProjector` (``rotate=``,
  ``null_space=``), ``projector.project(h)``;
- :class:`RandomProjectionSubclasses`: S random orthonormal directions per class, standardised;
- :class:`KMeansSubclasses`: S k-means clusters per class (faiss); ``u`` is the negative squared
  distance to each centroid over twice the class's mean within-cluster distance (a soft assignment);
- :func:`oracle_coordinates`: the true subclasses, when known.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import reference


def subclass_log_targets(u: torch.Tensor, teacher_logits: torch.Tensor, n_subclasses: int, beta: float = 1.0,
                         tau: float = 1.0) -> torch.Tensor:
    return reference.log_targets(u.float(), teacher_logits.float(), n_subclasses, beta, tau)


def _check_fit_inputs(h: torch.Tensor, labels: torch.Tensor, num_classes: int, n_subclasses: int):
    if h.ndim != 2 or labels.shape != (h.shape[0],):
        raise ValueError(f"embeddings must be (N, d) and labels (N,), got {tuple(h.shape)} and {tuple(labels.shape)}")
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts < n_subclasses).any():
        c = int(torch.nonzero(counts < n_subclasses)[0, 0])
        raise ValueError(f"class {c} has {int(counts[c])} rows, fewer than n_subclasses={n_subclasses}")


class RandomProjectionSubclasses:
    """Per class, S random orthonormal directions (seeded) instead of the principal ones."""

    def __init__(self, n_subclasses: int, seed: int = 0):
        self.n_subclasses, self.seed = n_subclasses, seed

    def fit(self, h: torch.Tensor, labels: torch.Tensor, num_classes: int) -> "RandomProjectionSubclasses":
        _check_fit_inputs(h, labels, num_classes, self.n_subclasses)
        g = torch.Generator().manual_seed(self.seed)
        h = h.double()
        d, s = h.shape[1], self.n_subclasses
        self.directions, self.mean, self.scale = [], [], []
        for c in range(num_classes):
            q, _ = torch.linalg.qr(torch.randn(d, s, generator=g, dtype=torch.float64))
            rows = h[labels == c]
            coords = (rows - rows.mean(0)) @ q
            self.directions.append(q)
            self.mean.append(rows.mean(0))
            self.scale.append(coords.std(0).clamp(min=1e-12))
        return self

    def project(self, h: torch.Tensor) -> torch.Tensor:
        h = h.double()
        return torch.cat([((h - m) @ q) / sc for q, m, sc in zip(self.directions, self.mean, self.scale)], 1).float()


class KMeansSubclasses:
    """Per class, S k-means centroids (faiss); ``u_{c,s} = −‖h − μ_{c,s}‖² / (2 σ_c²)``."""

    def __init__(self, n_subclasses: int, seed: int = 0, iterations: int = 25, gpu: Optional[bool] = None):
        self.n_subclasses, self.seed, self.iterations = n_subclasses, seed, iterations
        self.gpu = gpu  # None: on the GPUs when faiss has any (the faiss-gpu wheel: the ``gpu`` extra)

    def fit(self, h: torch.Tensor, labels: torch.Tensor, num_classes: int) -> "KMeansSubclasses":
        try:
            import faiss
        except ImportError as exc:  # pragma: no cover - faiss is an optional extra
            raise ImportError("k-means subclasses need faiss: pip install 'lelp_fast[faiss]'") from exc
        _check_fit_inputs(h, labels, num_classes, self.n_subclasses)
        self.centroids, self.sigma2 = [], []
        for c in range(num_classes):
            rows = np.ascontiguousarray(h[labels == c].float().numpy())
            km = faiss.Kmeans(rows.shape[1], self.n_subclasses, niter=self.iterations, seed=self.seed + c,
                              verbose=False, min_points_per_centroid=1, gpu=self._use_gpu(faiss))
            km.train(rows)
            dist, _ = km.index.search(rows, 1)
            self.centroids.append(torch.from_numpy(km.centroids.copy()).double())
            self.sigma2.append(max(float(dist.mean()), 1e-12))
        return self

    def _use_gpu(self, faiss) -> bool:
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if self.gpu and gpus == 0:
            raise ValueError("gpu=True, but this faiss sees no GPU: install faiss-gpu (pip install 'lelp_fast[gpu]')")
        return bool(gpus) if self.gpu is None else self.gpu

    def project(self, h: torch.Tensor) -> torch.Tensor:
        h = h.double()
        return torch.cat([-torch.cdist(h, mu).pow(2) / (2 * s2) for mu, s2 in zip(self.centroids, self.sigma2)],
                         1).float()


def oracle_coordinates(subclass_ids: torch.Tensor, labels: torch.Tensor, num_classes: int, n_subclasses: int,
                       scale: float = 10.0) -> torch.Tensor:
    """``u`` that puts each row on its true subclass: ``scale`` at (label, subclass id), 0 elsewhere.

    ``subclass_ids`` numbers the subclasses within each class, 0..S−1.
    """
    if (subclass_ids < 0).any() or (subclass_ids >= n_subclasses).any():
        raise ValueError(f"subclass_ids must be in [0, {n_subclasses - 1}]")
    u = torch.zeros(labels.shape[0], num_classes * n_subclasses)
    u[torch.arange(labels.shape[0]), labels * n_subclasses + subclass_ids] = scale
    return u
