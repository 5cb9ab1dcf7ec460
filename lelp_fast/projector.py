"""LELPProjector: fit orchestration, the compiled affine map, and safetensors save/load."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import torch

from . import reference
from ._checks import (
    as_tensor,
    check_choice,
    check_finite,
    check_float,
    check_labels,
    check_matrix,
    check_positive,
)
from .fit import ExactClassStatistics
from .ops.targets import lelp_targets

__version__ = "0.1.0"

ArrayLike = Union[torch.Tensor, np.ndarray]
FORMAT_NAME = "lelp_fast.projector"
FORMAT_VERSION = 1


class LELPProjector:
    """Per-class principal subspaces of teacher embeddings, compiled to ``u = h A + e``.

    Fit once on teacher embeddings (in memory or as an iterable of chunks), then turn any
    embeddings into LELP targets ``log t`` (N x C*S) with :meth:`targets`.

    Args:
        n_subclasses: S, pseudo-subclasses per class.
        beta: default subclass temperature β used by :meth:`targets`.
        tau: default class temperature τ.
        null_space: project out the directions the teacher head reads (paper §3.1). ``None``
            means on when a head is given.
        rotate: apply a seeded Haar rotation to each class's top-S eigenvectors.
        standardize: divide each coordinate by its standard deviation (scale-free β).
        seed: seed of the rotations.
        assign: ``"label"`` fits each class on rows with that label; ``"teacher"`` on rows the
            teacher predicts as that class.
    """

    def __init__(
        self,
        n_subclasses: int = 4,
        *,
        beta: float = 1.0,
        tau: float = 1.0,
        null_space: Optional[bool] = None,
        rotate: bool = True,
        standardize: bool = True,
        seed: int = 0,
        assign: str = "label",
    ):
        if not isinstance(n_subclasses, int) or n_subclasses < 1:
            raise ValueError(f"n_subclasses must be a positive integer, got {n_subclasses!r}")
        check_positive("beta", beta)
        check_positive("tau", tau)
        check_choice("assign", assign, ("label", "teacher"))
        self.n_subclasses = n_subclasses
        self.beta = float(beta)
        self.tau = float(tau)
        self.null_space = null_space
        self.rotate = rotate
        self.standardize = standardize
        self.seed = int(seed)
        self.assign = assign
        self.method = "exact"
        # Fitted state.
        self.A: Optional[torch.Tensor] = None  # (d, K) fp32
        self.e: Optional[torch.Tensor] = None  # (K,) fp32
        self.head_weight: Optional[torch.Tensor] = None  # (C, d) fp32
        self.head_bias: Optional[torch.Tensor] = None  # (C,) fp32
        self.eigenvalues: Optional[torch.Tensor] = None  # (C, S) top eigenvalues, fp64
        self.total_variance: Optional[torch.Tensor] = None  # (C,) trace of each covariance
        self.class_counts: Optional[torch.Tensor] = None  # (C,) rows per class
        self.num_classes: Optional[int] = None
        self.dim: Optional[int] = None
        self._fused = None

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        embeddings: Union[ArrayLike, Iterable],
        labels: Optional[ArrayLike] = None,
        *,
        head_weight: Optional[ArrayLike] = None,
        head_bias: Optional[ArrayLike] = None,
        teacher_logits: Optional[ArrayLike] = None,
        num_classes: Optional[int] = None,
        progress: bool = False,
    ) -> "LELPProjector":
        """Fits the per-class subspaces.

        Args:
            embeddings: (N, d) tensor/array, or an iterable of chunks ``(embeddings, labels)`` or
                ``(embeddings, labels, teacher_logits)`` (then ``labels`` and ``teacher_logits``
                must be None here).
            labels: (N,) integer class labels (needed unless ``assign="teacher"``).
            head_weight, head_bias: the teacher head ``W`` (C, d) and ``b`` (C,). With a head,
                class logits are ``h Wᵀ + b`` and the null-space projection is on by default.
            teacher_logits: (N, C) class logits, when no head is given.
            num_classes: C, when neither the head nor teacher logits give it.
            progress: show a progress bar over chunks.
        Returns:
            self.
        """
        chunks = self._as_chunks(embeddings, labels, teacher_logits)
        w = b = None
        if head_weight is not None:
            w = as_tensor("head_weight", head_weight).to(torch.float64)
            check_matrix("head_weight", w)
            check_finite("head_weight", w)
            b = torch.zeros(w.shape[0], dtype=torch.float64)
            if head_bias is not None:
                b = as_tensor("head_bias", head_bias).to(torch.float64)
                if b.shape != (w.shape[0],):
                    raise ValueError(f"head_bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        elif head_bias is not None:
            raise ValueError("head_bias was given without head_weight; pass both or neither")
        use_null_space = self.null_space if self.null_space is not None else w is not None
        if use_null_space and w is None:
            raise ValueError("null_space=True needs head_weight (the teacher head to project out)")

        stats: Optional[ExactClassStatistics] = None
        n_classes = w.shape[0] if w is not None else num_classes
        if n_classes is None and isinstance(embeddings, (torch.Tensor, np.ndarray)):
            if teacher_logits is not None and np.ndim(teacher_logits) == 2:
                n_classes = int(teacher_logits.shape[1])
            elif labels is not None and len(labels) > 0:
                n_classes = int(as_tensor("labels", labels).max()) + 1
        progress_bar = _progress(progress, "fit", unit="rows")
        for i, chunk in enumerate(chunks):
            h, y, z = self._check_chunk(i, chunk, w, b, n_classes)
            if n_classes is None:
                if z is None:
                    raise ValueError(
                        "num_classes is required when fitting from chunks without a head or teacher logits"
                    )
                n_classes = z.shape[1]
                check_labels("labels", y, n_classes, h.shape[0])
            if stats is None:
                projector = reference.null_space_projector(w) if use_null_space else None
                stats = ExactClassStatistics(n_classes, h.shape[1], projector)
                d = h.shape[1]
                if self.n_subclasses * n_classes > d:
                    raise ValueError(
                        f"n_subclasses * num_classes = {self.n_subclasses * n_classes} exceeds the "
                        f"embedding dimension d={d}; lower n_subclasses"
                    )
                if use_null_space and self.n_subclasses > d - n_classes:
                    raise ValueError(
                        f"n_subclasses={self.n_subclasses} exceeds d - C = {d - n_classes}, the "
                        "dimension left after the null-space projection; lower n_subclasses"
                    )
            elif h.shape[1] != stats.dim:
                raise ValueError(f"chunk {i}: embeddings have d={h.shape[1]}, earlier chunks had d={stats.dim}")
            stats.update(h, y)
            progress_bar.update(h.shape[0])
        progress_bar.close()
        if stats is None:
            raise ValueError("embeddings is empty: no rows to fit on")
        self._finish_fit(stats, w, b)
        return self

    def _as_chunks(self, embeddings, labels, teacher_logits):
        if isinstance(embeddings, (torch.Tensor, np.ndarray)):
            return [(embeddings, labels, teacher_logits)]
        if labels is not None or teacher_logits is not None:
            raise ValueError(
                "labels/teacher_logits must be inside the chunks when embeddings is an iterable of chunks"
            )
        if not hasattr(embeddings, "__iter__"):
            raise TypeError(
                f"embeddings must be a tensor, a numpy array or an iterable of chunks, got {type(embeddings).__name__}"
            )
        return embeddings

    def _check_chunk(self, i, chunk, w, b, n_classes) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        if not isinstance(chunk, (tuple, list)) or len(chunk) not in (2, 3):
            raise ValueError(f"chunk {i} must be (embeddings, labels) or (embeddings, labels, teacher_logits)")
        h = as_tensor("embeddings", chunk[0])
        check_matrix("embeddings", h)
        check_float("embeddings", h)
        check_finite("embeddings" if i == 0 else f"embeddings (chunk {i})", h)
        z = None
        if len(chunk) == 3 and chunk[2] is not None:
            z = as_tensor("teacher_logits", chunk[2])
            check_matrix("teacher_logits", z, cols=n_classes, cols_name="C")
            check_finite("teacher_logits", z)
        if w is not None and h.shape[1] != w.shape[1]:
            raise ValueError(f"embeddings have d={h.shape[1]} but head_weight has d={w.shape[1]}")
        if self.assign == "teacher":
            if z is None and w is not None:
                z = h.to(torch.float64) @ w.T + b
            if z is None:
                raise ValueError('assign="teacher" needs head_weight or teacher_logits to read predictions from')
            y = z.argmax(dim=1)
        else:
            if chunk[1] is None:
                raise ValueError('labels are required (or use assign="teacher")')
            y = as_tensor("labels", chunk[1])
        if n_classes is not None:
            check_labels("labels", y, n_classes, h.shape[0])
        return h, y, z

    def _finish_fit(self, stats: ExactClassStatistics, w, b) -> None:
        s = self.n_subclasses
        for c in range(stats.num_classes):
            n_c = int(stats.count[c])
            if n_c < s + 1:
                raise ValueError(
                    f"class {c} has {n_c} rows but n_subclasses={s} needs at least {s + 1}; "
                    "lower n_subclasses or add rows of that class"
                )
        means, covs = stats.moments()
        directions, scales, evals = reference.class_subspaces(
            covs, s, rotate=self.rotate, standardize=self.standardize, seed=self.seed
        )
        a, e = reference.compile_affine(directions, scales, means)
        self.A = a.to(torch.float32).contiguous()
        self.e = e.to(torch.float32).contiguous()
        self.head_weight = None if w is None else w.to(torch.float32).contiguous()
        self.head_bias = None if b is None else b.to(torch.float32).contiguous()
        self.eigenvalues = evals
        self.total_variance = torch.diagonal(covs, dim1=1, dim2=2).sum(-1)
        self.class_counts = stats.count.clone()
        self.num_classes = stats.num_classes
        self.dim = stats.dim
        self.null_space = stats.projector is not None
        self._fused = None

    # ------------------------------------------------------------- apply

    @property
    def n_outputs(self) -> int:
        """K = C * S, the number of student outputs."""
        self._require_fitted()
        return self.num_classes * self.n_subclasses

    def _require_fitted(self) -> None:
        if self.A is None:
            raise RuntimeError("this LELPProjector is not fitted yet: call fit() or LELPProjector.load()")

    def fused_map(self, with_head: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """``([A | Wᵀ], [e | b])`` when ``with_head`` else ``(A, e)``: the one skinny GEMM's operands."""
        self._require_fitted()
        if not with_head:
            return self.A, self.e
        if self.head_weight is None:
            raise ValueError("this projector has no teacher head: pass teacher_logits to targets()")
        if self._fused is None:
            self._fused = (
                torch.cat([self.A, self.head_weight.T], dim=1).contiguous(),
                torch.cat([self.e, self.head_bias]).contiguous(),
            )
        return self._fused

    def project(self, embeddings: ArrayLike) -> torch.Tensor:
        """Subclass coordinates ``u = h A + e`` (N x K), in fp32 (fp64 for fp64 input)."""
        self._require_fitted()
        h = as_tensor("embeddings", embeddings)
        check_matrix("embeddings", h, cols=self.dim, cols_name="the projector's d")
        dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        return h.to(dtype) @ self.A.to(h.device, dtype) + self.e.to(h.device, dtype)

    def targets(
        self,
        embeddings: ArrayLike,
        teacher_logits: Optional[ArrayLike] = None,
        *,
        beta: Optional[float] = None,
        tau: Optional[float] = None,
        out_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Log LELP targets ``log t`` (N x C*S) for teacher embeddings.

        Args:
            embeddings: (N, d) teacher embeddings.
            teacher_logits: (N, C) class logits; computed from the stored head when omitted.
            beta, tau: temperatures (default: the projector's).
            out_dtype: float32, float16 or bfloat16.
            backend: "auto", "torch", "cpu" or "cuda".
        """
        self._require_fitted()
        h = as_tensor("embeddings", embeddings)
        z = None if teacher_logits is None else as_tensor("teacher_logits", teacher_logits)
        weight, bias = self.fused_map(with_head=z is None)
        return lelp_targets(
            h,
            weight.to(h.device),
            bias.to(h.device),
            self.num_classes,
            self.n_subclasses,
            teacher_logits=z,
            beta=self.beta if beta is None else beta,
            tau=self.tau if tau is None else tau,
            out_dtype=out_dtype,
            backend=backend,
        )

    def captured_variance(self) -> torch.Tensor:
        """Per class, the fraction of total variance along the top-S directions (C,)."""
        self._require_fitted()
        return self.eigenvalues.sum(-1) / self.total_variance.clamp(min=1e-300)

    # ---------------------------------------------------------- save/load

    def metadata(self) -> dict:
        """The settings and shapes stored next to the tensors."""
        self._require_fitted()
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "num_classes": self.num_classes,
            "n_subclasses": self.n_subclasses,
            "dim": self.dim,
            "beta": self.beta,
            "tau": self.tau,
            "seed": self.seed,
            "method": self.method,
            "null_space": bool(self.null_space),
            "rotate": self.rotate,
            "standardize": self.standardize,
            "assign": self.assign,
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the projector as safetensors, atomically (temp file + rename)."""
        from safetensors.torch import save_file

        self._require_fitted()
        tensors = {
            "A": self.A,
            "e": self.e,
            "eigenvalues": self.eigenvalues,
            "total_variance": self.total_variance,
            "class_counts": self.class_counts,
        }
        if self.head_weight is not None:
            tensors["head_weight"] = self.head_weight
            tensors["head_bias"] = self.head_bias
        meta = {k: json.dumps(v) for k, v in self.metadata().items()}
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "LELPProjector":
        """Reads a projector written by :meth:`save`, checking its format and shapes."""
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corruption
            raise ValueError(f"{path}: not a readable safetensors projector ({exc})") from exc
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not a lelp_fast projector (format={meta.get('format')!r})")
        obj = cls(
            meta["n_subclasses"],
            beta=meta["beta"],
            tau=meta["tau"],
            null_space=meta["null_space"],
            rotate=meta["rotate"],
            standardize=meta["standardize"],
            seed=meta["seed"],
            assign=meta["assign"],
        )
        obj.method = meta["method"]
        obj.num_classes = meta["num_classes"]
        obj.dim = meta["dim"]
        k = obj.num_classes * obj.n_subclasses
        obj.A, obj.e = tensors["A"], tensors["e"]
        if obj.A.shape != (obj.dim, k) or obj.e.shape != (k,):
            raise ValueError(f"{path}: tensor shapes do not match its metadata (C, S, d)")
        obj.head_weight = tensors.get("head_weight")
        obj.head_bias = tensors.get("head_bias")
        obj.eigenvalues = tensors["eigenvalues"]
        obj.total_variance = tensors["total_variance"]
        obj.class_counts = tensors["class_counts"]
        return obj

    def __repr__(self) -> str:
        if self.A is None:
            return f"LELPProjector(n_subclasses={self.n_subclasses}, unfitted)"
        return (
            f"LELPProjector(C={self.num_classes}, S={self.n_subclasses}, d={self.dim}, "
            f"beta={self.beta}, tau={self.tau}, null_space={bool(self.null_space)})"
        )


def _progress(enabled: bool, desc: str, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(desc=desc, disable=not enabled, **kwargs)
