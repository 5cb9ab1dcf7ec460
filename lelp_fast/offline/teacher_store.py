"""A store of plain teacher outputs for ordinary KD: logits, or top-k log-probabilities.

Training from stored teacher outputs is the most requested KD feature across the ecosystem, and
the stores that exist have no integrity or kill-resume. This one is the targets pipeline with a
different computation per chunk: the same shards, manifest with checksums per file, per-rank lock,
resume after a kill to identical bytes, ``torchrun`` sharing, and :class:`TargetsDataset` (or its
``to_hf_dataset``) to read it back.

- ``top_k=None`` stores the logits (N x C) in ``dtype``; the temperature is chosen when reading
  (``TargetsDataset(dir, tau=τ)`` gives ``log_softmax(z/τ)``: vanilla KD targets, S = 1).
- ``top_k=k`` stores ``log_softmax(z/τ)``'s k largest values (in ``dtype``) and their class indices
  (int32), for vocabularies too large to store whole; read back as dense rows with the top-k
  renormalised and every other class at probability 0 (sparse-logit KD).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .._checks import check_finite, check_positive
from .._dist import default_group, rank_world
from ..io.sources import DEFAULT_CHUNK_BYTES, ArraySource, EmbeddingSource, as_source
from . import pipeline, shards


def store_teacher_outputs(source, out_dir: str, *, top_k: Optional[int] = None, tau: float = 1.0,
                          format: str = "npy", dtype: str = "float16", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                          process_group=None, progress: bool = False, verify: bool = True) -> dict:
    """Writes the teacher outputs of every row of ``source`` into ``out_dir``; returns the manifest.

    Args:
        source: the teacher logits (an (N, C) array or tensor), a capture directory, or any source
            of the fit engine whose chunks carry teacher logits.
        top_k: store only the k most probable classes' log-probabilities (at ``tau``) and indices.
        tau: temperature of the stored top-k log-probabilities (with ``top_k`` only).
        format, dtype, chunk_bytes, process_group, progress, verify: as :func:`generate_targets`.
    """
    _check_arguments(format, dtype, top_k, tau)
    src = _logits_source(source)
    num_classes = _num_classes(src)
    if top_k is not None and top_k > num_classes:
        raise ValueError(f"top_k={top_k} is more than the teacher's {num_classes} classes")
    process_group = default_group(process_group)  # torchrun's when none is given
    rank, world = rank_world(process_group)
    settings = _settings(src, num_classes, top_k, tau, format, dtype, chunk_bytes)

    def compute(chunk, h, z):
        return _outputs(chunk, z, settings)

    return pipeline.run_in_directory(out_dir, compute, src, settings, chunk_bytes, None, process_group, rank, world,
                                     progress, verify)


def _check_arguments(format, dtype, top_k, tau) -> None:
    shards.check_format(format, dtype)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    check_positive("tau", tau)
    if top_k is None and tau != 1.0:
        raise ValueError("tau is chosen when reading stored logits (TargetsDataset(dir, tau=...)); pass it "
                         "only with top_k")


def _logits_source(source) -> EmbeddingSource:
    """Logits alone become a source whose rows are the logits (chunked by their bytes)."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        if source.ndim != 2:
            raise ValueError(f"teacher logits must be (rows x classes), got shape {tuple(source.shape)}")
        return ArraySource(source, None, source, name="teacher_logits")
    return as_source(source)


def _num_classes(src: EmbeddingSource) -> int:
    known = getattr(src, "num_classes", None) or (src.teacher_logits.shape[1]
                                                  if getattr(src, "teacher_logits", None) is not None else None)
    if known:
        return int(known)
    for chunk in src.chunks(DEFAULT_CHUNK_BYTES):  # a source that learns C from its data: the first chunk
        if chunk.teacher_logits is None:
            break
        return int(chunk.teacher_logits.shape[1])
    raise ValueError("the source has no teacher logits: give the logits, a capture directory, or a source "
                     "with teacher_logits")


def _settings(src, num_classes, top_k, tau, format, dtype, chunk_bytes) -> dict:
    """What the outputs depend on (a resume or a rerun must see exactly the same)."""
    return {"kind": "teacher_logits" if top_k is None else "teacher_topk",
            "source_fingerprint": src.fingerprint(), "n_rows": src.n_rows, "num_classes": num_classes,
            "n_subclasses": 1, "K": num_classes, "top_k": top_k, "beta": None,
            "tau": None if top_k is None else float(tau), "dtype": dtype, "format": format, "compact": False,
            "chunk_bytes": int(chunk_bytes)}


def _outputs(chunk, z, settings: dict) -> dict:
    if z is None:
        raise ValueError(f"rows {chunk.start_row}..: the source has no teacher logits")
    if z.ndim != 2 or z.shape[1] != settings["num_classes"]:
        raise ValueError(f"rows {chunk.start_row}..: teacher logits have shape {tuple(z.shape)}, expected "
                         f"(rows, {settings['num_classes']})")
    check_finite("teacher_logits", z)
    out_dtype = shards.DTYPES[settings["dtype"]]
    if settings["top_k"] is None:
        return {"teacher_logits": shards.to_stored("teacher_logits", z, out_dtype, chunk.start_row, "dtype").cpu()}
    log_p = torch.log_softmax(z.float() / settings["tau"], dim=-1)  # fp32, whatever the stored dtype
    values, indices = log_p.topk(settings["top_k"], dim=-1)
    return {"topk_log_probs": values.to(out_dtype).cpu(), "topk_indices": indices.to(torch.int32).cpu()}


def dense_topk_log_targets(log_probs: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) fp32 log-targets from top-k log-probabilities: the k renormalised to sum to 1, every other
    class at probability 0 (log 0 = -inf; the losses count 0 · log 0 as 0)."""
    log_p = log_probs.float()
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    out = torch.full((log_p.shape[0], num_classes), float("-inf"), dtype=torch.float32)
    return out.scatter_(1, indices.long(), log_p)


__all__ = ["dense_topk_log_targets", "store_teacher_outputs"]
