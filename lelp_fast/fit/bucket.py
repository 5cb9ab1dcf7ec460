"""Per-chunk preparation for the fit GEMMs: rows grouped by class, fp32, minus their class shift.

``backend="cpu"`` runs the fused C++ kernel (one pass: stable counting sort by class, dtype
conversion, shift, per-class fp64 sums, NaN/Inf flags); ``"torch"`` is the readable equivalent.
Measured on the project machine: docs/benchmarks.md, "fit per-chunk update".
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..ops import _dispatch

_DTYPE_CODES = _dispatch.DTYPE_CODES


class LabelOutOfRange(ValueError):
    """A label outside ``[0, num_classes)``; ``row`` is its index in the chunk."""

    def __init__(self, row: int, value: int, num_classes: int):
        # -100: a row without a label (capture keeps it); a fit by the teacher's classes takes it
        hint = ' (a row without a label: fit with assign="teacher" to take it)' if value == -100 else ""
        super().__init__(f"labels[{row}] = {value} is out of range: labels must lie in [0, {num_classes - 1}]{hint}")
        self.row = row


class Buckets(NamedTuple):
    x: torch.Tensor  # (n, d) fp32: class 0 rows, then class 1, ..., each minus its class shift
    counts: torch.Tensor  # (C,) int64 rows per class
    sums: torch.Tensor  # (C, d) fp64 sum of each class's shifted rows
    bad: Optional[torch.Tensor]  # (n,) bool over the input rows holding NaN/Inf, or None


def bucket_rows(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    shift: torch.Tensor,
    num_classes: int,
    backend: str = "auto",
    workspace: Optional[torch.Tensor] = None,
) -> Buckets:
    """Groups a chunk's rows by class for the statistics (see :class:`Buckets`).

    Labels must lie in ``[0, num_classes)`` (a ValueError names the first that does not).
    ``workspace``: a reusable fp32 buffer of at least n*d elements; reusing it across chunks saves
    the page faults of a fresh allocation.
    """
    labels = labels.to(torch.int64).contiguous()
    n, d = embeddings.shape
    chosen = _dispatch.resolve(backend, embeddings.device)
    if chosen == "cpu" and embeddings.dtype in _DTYPE_CODES and embeddings.stride(-1) == 1:
        if workspace is not None and workspace.numel() >= n * d and workspace.dtype == torch.float32:
            out = workspace.view(-1)[: n * d].view(n, d)
        else:
            out = torch.empty(n, d, dtype=torch.float32)
        shift32 = shift.to(torch.float32).contiguous()
        counts = torch.empty(num_classes, dtype=torch.int64)
        sums = torch.empty(num_classes, d, dtype=torch.float64)
        flags = torch.empty(n, dtype=torch.uint8)
        status = _dispatch.extension().bucket_rows_cpu(
            embeddings.data_ptr(), _DTYPE_CODES[embeddings.dtype], embeddings.stride(0), n, d,
            labels.data_ptr(), num_classes, shift32.data_ptr(), out.data_ptr(), counts.data_ptr(),
            sums.data_ptr(), flags.data_ptr(),
        )
        if status < 0:
            row = -status - 1
            raise LabelOutOfRange(row, int(labels[row]), num_classes)
        return Buckets(out, counts, sums, flags.bool() if status else None)

    bad_label = (labels < 0) | (labels >= num_classes)
    if bool(bad_label.any()):
        row = int(torch.nonzero(bad_label)[0, 0])
        raise LabelOutOfRange(row, int(labels[row]), num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    order = torch.argsort(labels, stable=True)
    row_class = labels[order]
    device = embeddings.device  # the torch path runs wherever the chunk is (a GPU fit, too)
    x = embeddings[order].to(torch.float32) - shift.to(device=device, dtype=torch.float32)[row_class]
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=device)
    sums.index_add_(0, row_class, x.to(torch.float64))
    sorted_bad = ~torch.isfinite(x).all(dim=1)
    bad = None
    if bool(sorted_bad.any()):
        bad = torch.zeros(n, dtype=torch.bool, device=device)
        bad[order] = sorted_bad
    return Buckets(x, counts, sums, bad)
