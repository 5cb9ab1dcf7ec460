"""Single- or multi-pass Nyström sketch of each class covariance (docs/algorithm.md, streaming fit).

Per class: ``Y_c = Σ (h − s_c)((h − s_c)ᵀ Ω_c)`` with an orthonormal, seeded test matrix
``Ω_c`` (d x k, the same on every rank), plus ``n_c``, ``Σ(h − s_c)`` and the trace terms.
``Y`` is centred afterwards by a rank-one correction. Reconstruction follows Tropp, Yurtsever,
Udell, Cevher (2017): a small shift ν, Cholesky of ``Ωᵀ(Y + νΩ)``, an SVD, eigenvalues
``max(σ² − ν, 0)``. Extra passes are subspace iterations: ``Ω ← orth(Y)`` and read again.

Null space: Ω is drawn inside range(Π), so ``Π Σ Π Ω = Π (Σ Ω)``: the rows are never projected.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..ops import _dispatch
from ._state import move_tensors


def _orthonormal_in_range(g: torch.Tensor, projector: Optional[torch.Tensor]) -> torch.Tensor:
    if projector is not None:
        g = projector @ g
    q, _ = torch.linalg.qr(g)
    return q


class SketchClassStatistics:
    """Additive Nyström sketch statistics for every class."""

    kind = "nystrom"

    def __init__(self, num_classes: int, dim: int, shift: torch.Tensor, sketch_size: int, seed: int,
                 projector: Optional[torch.Tensor] = None, head_basis: Optional[torch.Tensor] = None,
                 backend: str = "auto", device: torch.device = torch.device("cpu")):
        # "cpu": the fused C++ update (reads each class's rows once); otherwise two torch GEMMs,
        # in fp64 off the CPU (where fp32 GEMMs may run as TF32).
        self.device = torch.device(device)
        self.use_kernel = _dispatch.resolve(backend, self.device) == "cpu"
        self.compute_dtype = torch.float32 if self.device.type == "cpu" else torch.float64
        self.num_classes = num_classes
        self.dim = dim
        self.k = sketch_size
        self.shift = shift.to(torch.float64)
        self.projector = None if projector is None else projector.to(self.device)
        # Orthonormal basis of the head's row space: its variance is removed from the total.
        self.head_basis = None if head_basis is None else head_basis.to(self.device)
        gen = torch.Generator().manual_seed(int(seed) + 7919)
        g = torch.randn(dim, sketch_size, generator=gen, dtype=torch.float64)
        omega = _orthonormal_in_range(g, projector)  # drawn on the CPU: the same on every device
        self.omega = omega.unsqueeze(0).repeat(num_classes, 1, 1).contiguous().to(self.device)
        self.reset()

    def reset(self) -> None:
        """Clears the additive state (a new pass over the data)."""
        c, d, k = self.num_classes, self.dim, self.k
        r = 0 if self.head_basis is None else self.head_basis.shape[1]
        f64 = dict(dtype=torch.float64, device=self.device)
        self.count = torch.zeros(c, dtype=torch.int64, device=self.device)
        self.sum = torch.zeros(c, d, **f64)
        self.y = torch.zeros(c, d, k, **f64)
        self.sumsq = torch.zeros(c, **f64)
        self.head_gram = torch.zeros(c, r, r, **f64)
        self._set_update_omega()
        self._basis_update = None if self.head_basis is None else self.head_basis.to(self.compute_dtype)

    def _set_update_omega(self) -> None:
        """Ω in the update's dtype; for the C++ kernel, zero columns pad it to a multiple of 8."""
        pad = -self.k % 8 if self.use_kernel else 0
        self._omega_update = torch.nn.functional.pad(self.omega.to(self.compute_dtype), (0, pad)).contiguous()

    def update(self, x: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """Same inputs as :meth:`ExactClassStatistics.update`."""
        self.count += counts
        self.sum += sums
        start = 0
        for c, n_c in enumerate(counts.tolist()):
            if n_c:
                xc = x[start : start + n_c]
                if self.use_kernel:
                    self._fused_update(c, xc)
                else:
                    xc = xc.to(self.compute_dtype)
                    self.y[c] += (xc.T @ (xc @ self._omega_update[c])).to(torch.float64)
                    self.sumsq[c] += torch.linalg.vector_norm(xc).to(torch.float64) ** 2
                if self._basis_update is not None:
                    z = xc @ self._basis_update
                    self.head_gram[c] += (z.T @ z).to(torch.float64)
            start += n_c

    def _fused_update(self, c: int, xc: torch.Tensor) -> None:
        omega, xc = self._omega_update[c], xc.contiguous()
        y = torch.zeros(self.dim, omega.shape[1], dtype=torch.float64)
        sumsq = torch.zeros(1, dtype=torch.float64)
        _dispatch.extension().sketch_update_cpu(xc.data_ptr(), xc.shape[0], self.dim, omega.data_ptr(),
                                                omega.shape[1], y.data_ptr(), sumsq.data_ptr())
        self.y[c] += y[:, : self.k]
        self.sumsq[c] += sumsq[0]

    def to(self, device: torch.device) -> "SketchClassStatistics":
        """Moves the state to ``device``."""
        return move_tensors(self, device)

    def additive(self) -> Dict[str, torch.Tensor]:
        """The tensors summed across ranks."""
        return {"count": self.count, "sum": self.sum, "y": self.y, "sumsq": self.sumsq, "head_gram": self.head_gram}

    def state(self) -> Dict[str, torch.Tensor]:
        """Everything a checkpoint needs: the additive tensors and the current test matrices."""
        return {**self.additive(), "omega": self.omega}

    def load_state(self, state: Dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            getattr(self, k).copy_(v)
        self._set_update_omega()

    def _centred_products(self):
        """``Σ_c Ω_c`` for the centred (and projected) covariance, (C x d x k), fp64."""
        n = self.count.to(torch.float64).clamp(min=1)
        offset = self.sum / n.unsqueeze(1)
        y = self.y - n[:, None, None] * offset.unsqueeze(2) * (offset.unsqueeze(1) @ self.omega)
        y = y / (n - 1).clamp(min=1)[:, None, None]
        if self.projector is not None:
            y = self.projector @ y
        return offset, y

    def next_pass(self) -> None:
        """Subspace iteration: the next pass sketches with ``Ω ← orth(Σ Ω)``."""
        _, y = self._centred_products()
        self.omega = torch.stack([_orthonormal_in_range(y[c], self.projector) for c in range(self.num_classes)])
        self.reset()

    def top_eigenpairs(self, k: int, projector: Optional[torch.Tensor] = None):
        """Means, top-k eigenvalues and eigenvectors (Nyström), total variance; like the exact class."""
        from ..reference import fix_signs

        offset, y = self._centred_products()
        n = self.count.to(torch.float64).clamp(min=1)
        means = self.shift + offset
        if self.projector is not None:
            means = means @ self.projector
        total = (self.sumsq - n * (offset * offset).sum(1)) / (n - 1).clamp(min=1)
        if self.head_basis is not None:
            # Remove the variance along the head's directions: trace(U^T Σ U).
            ob = offset @ self.head_basis
            head_var = torch.diagonal(self.head_gram, dim1=1, dim2=2).sum(-1) - n * (ob * ob).sum(1)
            total = total - head_var / (n - 1).clamp(min=1)
        evals, evecs = [], []
        for c in range(self.num_classes):
            lam, vec = nystrom_eigenpairs(y[c], self.omega[c])
            evals.append(lam[:k])
            evecs.append(fix_signs(vec[:, :k]))  # the exact method's sign convention
        return means, torch.stack(evals), torch.stack(evecs), total


def nystrom_eigenpairs(y: torch.Tensor, omega: torch.Tensor):
    """Eigenpairs of the Nyström approximation from ``Y = A Ω`` (A symmetric PSD), descending.

    Tropp et al. (2017), Algorithm 3: shift ν, Cholesky, SVD. The shift grows if rounding makes
    ``Ωᵀ Y`` indefinite.
    """
    scale = torch.linalg.matrix_norm(y, ord="fro").item()
    if scale == 0.0:
        return torch.zeros(y.shape[1], dtype=y.dtype), omega.clone()
    nu = 1e-7 * scale
    for _ in range(8):
        y_nu = y + nu * omega
        b = omega.T @ y_nu
        b = 0.5 * (b + b.T)
        chol, info = torch.linalg.cholesky_ex(b)
        if int(info) == 0:
            break
        nu *= 10.0
    else:  # pragma: no cover - only for pathological inputs
        raise RuntimeError("Nyström reconstruction failed: Ωᵀ Y is not positive definite")
    f = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T  # Y_ν L^{-T}
    u, sigma, _ = torch.linalg.svd(f, full_matrices=False)
    lam = (sigma * sigma - nu).clamp(min=0.0)
    return lam, u
