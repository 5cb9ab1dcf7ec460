"""LELPProjector: fit orchestration, the compiled affine map, and safetensors save/load."""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from . import reference
from ._checks import (
    as_tensor,
    check_choice,
    check_count,
    check_finite,
    check_matrix,
    check_positive,
)
from ._derived import on_device
from .io.integrity import (check_metadata_checksum, remove_stale_temps, tensors_sha256, with_metadata_checksum,
                           write_through_temp)
from .io.sources import DEFAULT_CHUNK_BYTES, ArraySource, EmbeddingSource, IterableSource, SourceLike, as_source
from .ops.targets import lelp_targets

# Heads of one teacher stored in different dtypes (a capture in bf16, a fit from an fp32 one) differ by
# the rounding, under 2^-8 of the weight's largest value; another teacher's head differs by about its size.
SAME_HEAD_TOLERANCE = 1e-2
# A source with no stored head is checked on its first rows' logits, to the tolerance capture holds a
# head it finds to with low-precision tensors (capture.runner.check_head_matches), plus the rounding of
# the embeddings to their stored dtype.
LOGITS_CHECK_ROWS = 256
HEAD_LOGITS_TOLERANCE = 3e-2

__version__ = "0.1.0"

ArrayLike = Union[torch.Tensor, np.ndarray]
FORMAT_NAME = "lelp_fast.projector"
# 2: one JSON metadata key holding the tensors_sha256 checksum; 3: and the metadata's own checksum
FORMAT_VERSION = 3
METADATA_KEY = "lelp_fast"


DEFAULT_BETA = 0.25
"""The subclass temperature β when none is given. 0.25 was best or level with the best on every
real-data sweep (docs/results.md, "Defaults"); the earlier 1.0 made the subclass split nearly flat
(mean entropy about 0.8 of its maximum) and kept a third of the gain or less."""


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
        method: ``"exact"`` (d x d covariance per class, one pass), ``"nystrom"`` (sketch of size
            S + ``oversampling``, ``passes`` passes over the data) or ``"auto"`` (a cost model:
            exact for one-shot iterators, small corpora and small d, where the Gram's n d² flops
            cost less than the sketch's passes; nystrom otherwise, e.g. 1.6 M rows at d = 768).
        oversampling: extra sketch columns beyond S (nystrom).
        passes: passes over the data for nystrom; 1 is a single-pass sketch, each further pass a
            subspace iteration (3 reach >= 99.5 % of the exact captured variance on decaying spectra).
        iteration_sample: share of the chunks (every 1/x-th, at least 100 k rows) that the nystrom
            passes before the last read; they only steer the sketch's test matrix, and the last
            pass reads every chunk. 1.0 reads all chunks in every pass.
    """

    def __init__(
        self,
        n_subclasses: int = 4,
        *,
        beta: float = DEFAULT_BETA,
        tau: float = 1.0,
        null_space: Optional[bool] = None,
        rotate: bool = True,
        standardize: bool = True,
        seed: int = 0,
        assign: str = "label",
        method: str = "auto",
        oversampling: int = 10,
        passes: int = 3,
        iteration_sample: float = 0.125,
    ):
        n_subclasses = check_count("n_subclasses", n_subclasses)
        check_positive("beta", beta)
        check_positive("tau", tau)
        check_choice("assign", assign, ("label", "teacher"))
        self.n_subclasses = n_subclasses
        self.beta = float(beta)
        self.tau = float(tau)
        self.null_space = null_space  # after a fit: whether it was applied
        self._null_space_setting = null_space  # what the caller asked for; a refit starts from it
        self.rotate = rotate
        self.standardize = standardize
        self.seed = int(seed)
        self.assign = assign
        check_choice("method", method, ("auto", "exact", "nystrom"))
        oversampling = check_count("oversampling", oversampling, minimum=0)
        passes = check_count("passes", passes)
        if not isinstance(iteration_sample, (int, float)) or not 0.0 < iteration_sample <= 1.0:
            raise ValueError(f"iteration_sample must lie in (0, 1], got {iteration_sample!r}")
        self.method = method
        self.oversampling = oversampling
        self.passes = passes
        self.iteration_sample = float(iteration_sample)
        self.fitted_method: Optional[str] = None
        self.fit_info: dict = {}
        self.fit_timing: dict = {}
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
        embeddings: SourceLike,
        labels: Optional[ArrayLike] = None,
        *,
        teacher_logits: Optional[ArrayLike] = None,
        head_weight: Optional[ArrayLike] = None,
        head_bias: Optional[ArrayLike] = None,
        num_classes: Optional[int] = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        nan_policy: str = "raise",
        process_group=None,
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        checkpoint_every: int = 16,
        resume: bool = False,
        progress: bool = False,
        backend: str = "auto",
        device: Union[str, torch.device] = "cpu",
    ) -> "LELPProjector":
        """Fits the per-class subspaces, streaming the data in chunks of ``chunk_bytes``.

        Args:
            embeddings: (N, d) tensor/array (memory-mapped too), a file path (``.npy``,
                ``.safetensors``, ``.parquet``), an :class:`~lelp_fast.io.EmbeddingSource`, or an
                iterable of chunks ``(embeddings, labels[, teacher_logits])`` (then ``labels``
                and ``teacher_logits`` must be None here).
            labels: (N,) integer class labels (needed unless ``assign="teacher"``).
            teacher_logits: (N, C) class logits, when no head is given; given with a head, the head
                must give them (its weight up to a constant a row and a class, its bias when given up
                to one constant: ``head_logits_gap``).
            head_weight, head_bias: the teacher head ``W`` (C, d) and ``b`` (C,). With a head,
                class logits are ``h Wᵀ + b`` and the null-space projection is on by default.
                ``head_bias`` not given: a capture's stored bias where its weight is the one given,
                else the bias the rows' teacher logits show (up to one constant), else zero (no
                logits read: none given, iterable sources, under two finite rows in the first chunk).
                Not given, a capture directory's stored head is used (``null_space=False`` fits
                without it).
            num_classes: C, when neither the head, the logits nor in-memory labels give it.
            chunk_bytes: embedding bytes read per chunk (memory stays bounded by it, not by N).
            nan_policy: ``"raise"`` names the first non-finite row; ``"skip"`` drops and counts them.
            process_group: a ``torch.distributed`` group; rows are sharded by rank (chunk ``i`` on
                rank ``i % world``) and the statistics summed with ``all_reduce``.
            checkpoint: file to checkpoint the statistics to (atomically) every
                ``checkpoint_every`` chunks; with ``resume=True`` an existing one is continued.
            progress: show a progress bar (rows/s, GB/s).
            backend: per-chunk kernels: ``"auto"``, ``"cpu"`` (C++) or ``"torch"``.
            device: where the statistics are accumulated. ``"cuda"`` copies each chunk to the
                GPU and runs the bucketing and fp64 GEMMs there in torch (it matched the CPU fit on
                an H200); the eigensolver runs on the CPU either way.
        Returns:
            self.
        """
        from .fit.engine import accumulate

        check_choice("nan_policy", nan_policy, ("raise", "skip"))
        checkpoint_every = check_count("checkpoint_every", checkpoint_every)
        if resume and checkpoint is None:
            raise ValueError("resume=True (--resume) continues a checkpoint: pass checkpoint= (--checkpoint FILE)")
        source = as_source(embeddings, labels, teacher_logits)
        w, b, bias_tolerance, bias_from = _checked_head(head_weight, head_bias, source)
        setting = self._null_space_setting
        use_null_space = setting if setting is not None else w is not None
        if use_null_space and w is None:
            raise ValueError("null_space=True needs head_weight (the teacher head to project out)")
        settings = self._fit_settings(source, w, num_classes, nan_policy, chunk_bytes, backend, device)
        projector = reference.null_space_projector(w) if use_null_space else None
        result = accumulate(source, settings, head_weight=w, head_bias=b, projector=projector,
                            process_group=process_group, checkpoint=None if checkpoint is None else os.fspath(checkpoint),
                            checkpoint_every=checkpoint_every, resume=resume, progress=progress)
        self._set_fitted(result, w, b, projector is not None, settings.num_classes)
        if bias_tolerance is not None:  # how closely the logits showed the bias: require_same_teacher holds it so
            self.fit_info["head_bias_from_logits"] = bias_tolerance
        if bias_from is not None:  # a weight given without its bias: where the bias came from
            self.fit_info["head_bias_from"] = bias_from
        return self

    def _fit_settings(self, source, w, num_classes, nan_policy, chunk_bytes, backend, device):
        from .fit.engine import FitSettings

        if num_classes is not None:
            num_classes = check_count("num_classes", num_classes)
        return FitSettings(
            num_classes=_infer_num_classes(source, w, num_classes, self.assign), n_subclasses=self.n_subclasses,
            method=self.method, oversampling=self.oversampling, passes=self.passes,
            iteration_sample=self.iteration_sample, seed=self.seed, assign=self.assign, nan_policy=nan_policy,
            chunk_bytes=check_count("chunk_bytes", chunk_bytes), backend=backend, device=str(torch.device(device)))

    def _set_fitted(self, result, w, b, null_space: bool, num_classes: int) -> None:
        """The fitted state from the statistics' eigenpairs: the compiled map ``u = h A + e`` and the facts."""
        directions, scales = reference.subspaces_from_eigenpairs(
            result.evals, result.evecs, rotate=self.rotate, standardize=self.standardize, seed=self.seed
        )
        a, e = reference.compile_affine(directions, scales, result.means)
        self.A = a.to(torch.float32).contiguous()
        self.e = e.to(torch.float32).contiguous()
        self.head_weight = None if w is None else w.to(torch.float32).contiguous()
        self.head_bias = None if b is None else b.to(torch.float32).contiguous()
        self.eigenvalues = result.evals
        self.total_variance = result.total_variance
        self.class_counts = result.counts
        self.num_classes = num_classes
        self.dim = self.A.shape[0]
        self.null_space = null_space
        self.fitted_method = result.method
        self.fit_info = {"rows": result.rows_seen, "rows_skipped": result.rows_skipped}
        # Run facts that differ between identical fits: shown by the CLI, never saved (identical
        # fits give identical bytes).
        self.fit_timing = {"seconds": result.seconds, "bytes_read": result.bytes_read}
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
            raise ValueError("this projector has no teacher head, so the class logits cannot be computed from the "
                             "embeddings: pass teacher_logits (to targets(), or to the loss with the embeddings)")
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
            backend: "auto", "torch", "cpu", "cuda" or "triton" (as :func:`lelp_fast.ops.lelp_targets`).
        """
        self._require_fitted()
        h = as_tensor("embeddings", embeddings)
        z = None if teacher_logits is None else as_tensor("teacher_logits", teacher_logits)
        weight, bias = self.fused_map(with_head=z is None)
        return lelp_targets(
            h,
            on_device(weight, h.device),
            on_device(bias, h.device),
            self.num_classes,
            self.n_subclasses,
            teacher_logits=z,
            beta=self.beta if beta is None else beta,
            tau=self.tau if tau is None else tau,
            out_dtype=out_dtype,
            backend=backend,
        )

    def require_same_teacher(self, source: EmbeddingSource) -> None:
        """Refuses a source whose stored teacher head (a capture's) is not the head this projector was
        fitted with: its embeddings are another teacher's, where the directions mean nothing, though
        the widths agree. A head is the teacher's, the same on every split of its data. A source
        with no stored head (a capture made with ``forward=``, arrays, Parquet) is held to its
        teacher logits instead (``_require_logits_of_head``)."""
        if self.head_weight is None:
            return
        stored = source.head() if hasattr(source, "head") else None
        if stored is None:
            self._require_logits_of_head(source)
            return
        w, b = (torch.as_tensor(t).detach().cpu().to(torch.float32) for t in stored)
        fitted_w, fitted_b = self.head_weight.cpu(), self.head_bias.cpu()
        where = getattr(source, "directory", "the source")
        if w.shape != fitted_w.shape or b.shape != fitted_b.shape:
            raise ValueError(f"{where}: its teacher head is {tuple(w.shape)}, the projector's {tuple(fitted_w.shape)}: "
                             "its embeddings are another teacher's; fit a projector on this teacher's capture")
        gap_w = _weight_gap(w, fitted_w)
        if gap_w is not None:
            raise ValueError(f"{where}: its teacher head's weight differs from the projector's by up to {gap_w:.3g}, "
                             "so its embeddings are another teacher's; fit a projector on this teacher's capture")
        scale = max(float(fitted_w.abs().max()), 1e-30)  # the bias is held to the weight's scale too
        # the bias up to one constant, which no softmax sees (a fit's bias taken from logits is centred)
        gap_b = float(((b - b.mean()) - (fitted_b - fitted_b.mean())).abs().max())
        estimated = self.fit_info.get("head_bias_from_logits", 0.0)  # known only as closely as the logits showed it
        if gap_b > max(SAME_HEAD_TOLERANCE * max(scale, float(fitted_b.abs().max())), estimated):
            raise ValueError(f"{where}: its teacher head's bias differs from the projector's by up to {gap_b:.3g} (the "
                             "weights agree; a constant aside): fit the projector with this head's bias (a fit given "
                             "--head-weight without --head-bias takes a capture's stored bias, else the one its rows' "
                             "logits show, else zero)")

    def _require_logits_of_head(self, source: EmbeddingSource) -> None:
        """Refuses a source whose teacher logits are not the fitted head applied to its embeddings
        (``head_logits_gap``): another teacher's rows of the same widths, which the head check of a
        capture with no stored head let through."""
        found = head_logits_gap(source, self.head_weight)
        if found is not None:
            raise ValueError(f"{_source_name(source)}: its teacher logits are not the projector's head applied to its "
                             f"embeddings ({found}), so its rows are another teacher's, or the head given to the fit "
                             "is not this teacher's (or its logits are scaled); fit a projector on these rows")

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
            "fitted_method": self.fitted_method,
            "oversampling": self.oversampling,
            "passes": self.passes,
            "iteration_sample": self.iteration_sample,
            "fit_info": self.fit_info,
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
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        # One metadata key: safetensors writes its metadata map in hash order, so several keys would
        # make identical fits differ in bytes.
        meta = {METADATA_KEY: json.dumps(with_metadata_checksum({**self.metadata(),
                                                                 "tensors_sha256": tensors_sha256(tensors)}),
                                         sort_keys=True)}
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):  # else the error names the temporary file
            raise FileNotFoundError(f"{path}: its directory {directory} does not exist")
        remove_stale_temps(path)
        write_through_temp(lambda tmp: save_file(tensors, tmp, metadata=meta), path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "LELPProjector":
        """Reads a projector written by :meth:`save`, checking its format and shapes."""
        from safetensors import safe_open

        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory, not a projector file (lelp-fast run writes "
                                    f"{os.path.join('WORK_DIR', 'projector.safetensors')})")
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corruption
            raise ValueError(f"{path}: not a readable safetensors projector ({exc})") from exc
        try:
            meta = json.loads(raw_meta[METADATA_KEY]) if METADATA_KEY in raw_meta else {
                k: json.loads(v) for k, v in raw_meta.items()}  # before format 2: one key per field
        except ValueError as exc:
            raise ValueError(f"{path}: corrupt projector metadata ({exc})") from exc
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not a lelp_fast projector (format={meta.get('format')!r})")
        version = meta.get("format_version")
        checksummed = isinstance(version, int) and version >= 3
        meta = check_metadata_checksum(meta, path, "refit or restore it", required=checksummed)
        stored = meta.pop("tensors_sha256", None)
        if stored is None:
            raise ValueError(f"{path}: projector has no tensor checksum (written before checksums); refit it")
        if tensors_sha256(tensors) != stored:
            raise ValueError(f"{path}: projector tensors fail their sha256 checksum (corrupt file); refit or "
                             "restore it")
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
        obj.fitted_method = meta.get("fitted_method")
        obj.oversampling = meta.get("oversampling", 10)
        obj.passes = meta.get("passes", 3)
        obj.iteration_sample = meta.get("iteration_sample", 1.0)  # older files: every pass read all
        obj.fit_info = meta.get("fit_info", {})
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


class _LogitsOfHead(NamedTuple):
    """How a head's weight fits a source's first rows' logits (``_fit_to_logits``)."""
    class_constants: torch.Tensor  # (C,): b's mean - b, for the logits' bias b
    weight_gap: float              # the largest gap beyond a constant a row and a class
    tolerance: float
    rows: str                      # the rows compared, and the tolerance, as a phrase
    projected: torch.Tensor        # h Wᵀ and the logits, for the scale hint
    logits: torch.Tensor

    def gap(self, head_bias: Optional[torch.Tensor]) -> Optional[str]:
        """How far off the logits are (a phrase for an error), else None; ``head_bias`` (when given)
        must be their bias up to one constant."""
        if self.weight_gap > self.tolerance:
            return (f"off by up to {self.weight_gap:.3g} {self.rows}, a constant a row or a class aside"
                    + _scale_hint(self.projected, self.logits, self.tolerance))
        if head_bias is None:
            return None
        b = head_bias.detach().cpu().to(torch.float32)
        bias_gap = float((b - b.mean() + self.class_constants).abs().max())
        if bias_gap > self.tolerance:
            return f"the weight agrees, but the bias is off by up to {bias_gap:.3g} {self.rows}, a constant aside"
        return None


def _fit_to_logits(source: EmbeddingSource, head_weight: torch.Tensor) -> Optional[_LogitsOfHead]:
    """``head_weight`` against the teacher logits of a source's first chunk's first rows (up to
    LOGITS_CHECK_ROWS finite ones, at least two), or None where there are none to read. Iterable
    sources are not read (their first chunk may be a teacher's forward pass)."""
    if (isinstance(source, IterableSource) or not source.rereadable
            or (isinstance(source, ArraySource) and source.teacher_logits is None)):
        return None
    chunks = iter(source.chunks(LOGITS_CHECK_ROWS * max(head_weight.shape[1], 1) * 8))
    chunk = next(chunks, None)
    getattr(chunks, "close", lambda: None)()  # a generator's reader (a mapped file) let go now
    h = None if chunk is None else chunk.embeddings
    z = None if chunk is None else chunk.teacher_logits
    if (z is None or z.ndim != 2 or h.ndim != 2 or z.shape[1] != head_weight.shape[0]
            or h.shape[1] != head_weight.shape[1] or not h.dtype.is_floating_point):
        return None  # shapes and dtypes are checked, and named, where the rows are read
    eps = torch.finfo(h.dtype).eps
    h = h[:LOGITS_CHECK_ROWS].detach().cpu().to(torch.float32)
    z = z[:LOGITS_CHECK_ROWS].detach().cpu().to(torch.float32)
    w = head_weight.detach().cpu().to(torch.float32)
    projected = torch.nn.functional.linear(h, w)
    gap = projected - z
    finite = gap.isfinite().all(dim=1)  # a bad row is named where it is read
    if int(finite.sum()) < 2:  # one row's gap is all a constant of its row and of each class
        return None
    gap, z, h, projected = gap[finite], z[finite], h[finite], projected[finite]
    gap = gap - gap.mean(dim=1, keepdim=True)
    class_constants = gap.mean(dim=0)  # -(the logits' bias - its mean)
    # the capture's tolerance for a head it finds, and the embeddings' rounding to their stored dtype
    rounding = 4 * eps * float((h.abs() @ w.abs().T).max())
    tolerance = HEAD_LOGITS_TOLERANCE * (1.0 + float(z.abs().max())) + rounding
    return _LogitsOfHead(class_constants, float((gap - class_constants).abs().max()), tolerance,
                         f"over {len(z)} finite rows of its first chunk, beyond {tolerance:.3g}", projected, z)


def head_logits_gap(source: EmbeddingSource, head_weight: torch.Tensor,
                    head_bias: Optional[torch.Tensor] = None) -> Optional[str]:
    """Where a source's teacher logits are not ``head_weight`` applied to its embeddings, on its first
    chunk's first rows (up to LOGITS_CHECK_ROWS), how far off (a phrase for an error), else None.
    The gap is taken up to a constant a row (the targets' softmax ignores it: log-probabilities pass)
    and a constant a class (the bias: with the logits given, the targets do not use the head's).
    With ``head_bias``, the class constants must be that bias too, up to one constant (targets from
    rows without logits take their class logits from it). Iterable sources are not read."""
    fit = _fit_to_logits(source, head_weight)
    return None if fit is None else fit.gap(head_bias)


def _scale_hint(projected: torch.Tensor, z: torch.Tensor, tolerance: float) -> str:
    """A clause for logits that are the head's times a factor (divided by a temperature, say), up to
    the constants head_logits_gap allows; "" if no factor fits them either."""
    def centred(x):
        x = x - x.mean(dim=1, keepdim=True)
        return x - x.mean(dim=0)

    p, zc = centred(projected.double()), centred(z.double())
    norm = float((p * p).sum())
    if norm == 0.0 or float(zc.abs().max()) <= tolerance:  # a factor of 0 fits: near-constant logits
        return ""
    factor = float((p * zc).sum()) / norm
    if factor <= 0.0 or float((zc - factor * p).abs().max()) > tolerance:
        return ""
    return (f"; they are its logits times {factor:.3g}, as if divided by a temperature of {1 / factor:.3g}: give "
            "the unscaled logits, the loss applies its own tau")


def _source_name(source: EmbeddingSource) -> str:
    return next((n for n in (getattr(source, a, None) for a in ("directory", "path", "name")) if n), "the source")


def _checked_head(head_weight, head_bias, source: EmbeddingSource):
    """The teacher head as fp64 ``(W (C x d), b (C,), tolerance, bias_from)``, or four Nones; without
    one given, the head a capture directory stored. A weight given without its bias takes the
    capture's stored bias where the weights agree, else the bias the rows' logits show (up to one
    constant; ``tolerance``: how closely they show it, None for a bias given or stored), else zero;
    ``bias_from`` says which ("capture", "logits", "zero"; None for a bias given or a stored head).
    A transposed ``W`` is named as such."""
    stored = None
    if head_weight is None:
        if head_bias is not None:
            raise ValueError("head_bias was given without head_weight; pass both or neither")
        stored = source.head()
        if stored is None:
            return None, None, None, None
        head_weight, head_bias = stored
    w = _checked_weight(head_weight, source)
    bias_from = None  # a bias given, or the capture's head taken whole
    if head_bias is None:
        head_bias = _stored_bias_of(source, w)
        bias_from = "capture" if head_bias is not None else None
    b = None if head_bias is None else _checked_bias(head_bias, w)
    # before the fit's pass, not at the targets after it; a bias given (or stored) is held to the logits too
    fit = _fit_to_logits(source, w)
    found = None if fit is None else fit.gap(b)
    if found is not None and stored is not None:  # checked against the logits when captured
        raise ValueError(f"{_source_name(source)}: its stored head no longer gives its teacher logits ({found}): a "
                         "shard may be damaged (read it with verify=True) or rerun the capture")
    if found is not None:
        raise ValueError(f"{_source_name(source)}: its teacher logits are not head_weight and head_bias applied to "
                         f"its embeddings ({found}): pass this teacher's head (W as (C, d), e.g. head.weight, and "
                         "its bias) with its logits unscaled (not divided by a temperature)")
    if b is not None:
        return w, b, None, bias_from
    if fit is not None:  # the logits' bias, up to one constant: rows without logits need it
        return w, -fit.class_constants.to(torch.float64), fit.tolerance, "logits"
    return w, torch.zeros(w.shape[0], dtype=torch.float64), None, "zero"


def _checked_weight(head_weight, source: EmbeddingSource) -> torch.Tensor:
    w = as_tensor("head_weight", head_weight).to(torch.float64)
    check_matrix("head_weight", w)
    check_finite("head_weight", w)
    dim = source.dim
    if dim is not None and w.shape[1] != dim:
        hint = " (it looks transposed: pass W as (C, d), e.g. head.weight)" if w.shape[0] == dim else ""
        raise ValueError(f"head_weight has shape {tuple(w.shape)} but the embeddings have d={dim} columns{hint}")
    return w


def _checked_bias(head_bias, w: torch.Tensor) -> torch.Tensor:
    b = as_tensor("head_bias", head_bias).to(torch.float64)
    if b.shape != (w.shape[0],):
        hint = (" (head_weight looks transposed: pass W as (C, d), e.g. head.weight)"
                if w.ndim == 2 and b.shape == (w.shape[1],) else "")
        raise ValueError(f"head_bias must have shape ({w.shape[0]},), got {tuple(b.shape)}{hint}")
    check_finite("head_bias", b.reshape(-1, 1))
    return b


def _stored_bias_of(source: EmbeddingSource, w: torch.Tensor) -> Optional[torch.Tensor]:
    """A capture's stored bias where its stored weight is ``w`` (to ``require_same_teacher``'s
    tolerance), else None: exact, where the logits of a bf16 forward show the bias to a few hundredths."""
    stored = source.head()
    if stored is None:
        return None
    stored_w, stored_b = (torch.as_tensor(t).detach().cpu().to(torch.float64) for t in stored)
    if stored_w.shape != w.shape or _weight_gap(stored_w, w) is not None:
        return None
    return stored_b


def _weight_gap(w: torch.Tensor, reference: torch.Tensor) -> Optional[float]:
    """The largest difference of two heads' weights (of one shape) where it is more than one teacher's
    heads differ by (SAME_HEAD_TOLERANCE of the reference's largest value: another dtype's rounding),
    else None."""
    gap = float((w - reference).abs().max())
    return gap if gap > SAME_HEAD_TOLERANCE * max(float(reference.abs().max()), 1e-30) else None


def _infer_num_classes(source: EmbeddingSource, head_weight, num_classes: Optional[int],
                       assign: str = "label") -> Optional[int]:
    """C from the head, the caller, in-memory teacher logits or the source's labels, in that order
    (``assign="teacher"`` reads no labels: the fit takes the teacher's classes)."""
    if head_weight is not None:
        if num_classes is not None and num_classes != head_weight.shape[0]:
            raise ValueError(f"num_classes={num_classes} but head_weight has {head_weight.shape[0]} rows")
        return head_weight.shape[0]
    if num_classes is not None:
        return int(num_classes)
    top = source.max_label()
    c = _logits_width(source)
    if c is not None:
        if assign == "label" and top is not None and top >= c:  # else named as a label out of range
            raise ValueError(f"teacher_logits have {c} columns (C = {c}), but the labels go up to {top}: give the "
                             "logits of every class")
        return c
    return None if top is None else top + 1


def _logits_width(source) -> Optional[int]:
    """C from the teacher logits a source holds: in-memory ones, or a capture's stored ones (a capture
    made with ``forward=`` stores no head; its labels may cover fewer classes, or none: -100)."""
    if isinstance(source, ArraySource) and source.teacher_logits is not None:
        return int(source.teacher_logits.shape[1]) if getattr(source.teacher_logits, "ndim", 0) == 2 else None
    width = getattr(source, "num_classes", None)  # CaptureSource: its stored logits' width
    return width if isinstance(width, int) else None
