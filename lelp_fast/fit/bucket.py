"""Per-chunk preparation for the fit GEMMs: rows grouped by class, fp32, minus their class shift.

``backend="cpu"`` runs the fused C++ gather (one pass: index, convert, subtract);
``"torch"`` is the readable equivalent. Measured on the project machine (65 536 x 768 fp16 chunk,
2 classes): see docs/benchmarks.md, "fit per-chunk update".
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops import _dispatch

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def bucket_rows(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    shift: torch.Tensor,
    num_classes: int,
    backend: str = "auto",
    workspace: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Returns ``(x, counts, bad)``: ``x`` (n x d fp32) holds the rows of class 0, then class 1, ...,
    each minus ``shift[class]``; ``counts`` (C,) says how many rows each class has; ``bad`` is a
    bool mask over the *input* rows holding NaN/Inf, or None when every row is finite.

    ``workspace``: a reusable fp32 buffer of at least n*d elements; reusing it across chunks saves
    the page faults of a fresh allocation (about half the time of this step on the project machine).
    """
    labels = labels.to(torch.int64)
    counts = torch.bincount(labels, minlength=num_classes)
    order = torch.argsort(labels, stable=True)
    row_class = labels[order]
    n, d = embeddings.shape
    chosen = _dispatch.resolve(backend, embeddings.device)
    if chosen == "cpu" and embeddings.dtype in _DTYPE_CODES and embeddings.stride(-1) == 1:
        shift32 = shift.to(torch.float32).contiguous()
        if workspace is not None and workspace.numel() >= n * d and workspace.dtype == torch.float32:
            out = workspace.view(-1)[: n * d].view(n, d)
        else:
            out = torch.empty(n, d, dtype=torch.float32)
        flags = torch.empty(n, dtype=torch.uint8)
        n_bad = _dispatch.extension().gather_rows_cpu(
            embeddings.data_ptr(), _DTYPE_CODES[embeddings.dtype], embeddings.stride(0), d,
            order.data_ptr(), n, row_class.data_ptr(), shift32.data_ptr(), out.data_ptr(), flags.data_ptr(),
        )
        sorted_bad = flags.bool() if n_bad else None
    else:
        out = embeddings[order].to(torch.float32) - shift.to(torch.float32)[row_class]
        sorted_bad = ~torch.isfinite(out).all(dim=1)
        if not bool(sorted_bad.any()):
            sorted_bad = None
    bad = None
    if sorted_bad is not None:
        bad = torch.zeros(n, dtype=torch.bool)
        bad[order] = sorted_bad
    return out, counts, bad
