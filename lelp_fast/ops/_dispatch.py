"""Backend selection: the fastest available backend for a tensor's device, or a forced one.

``backend="auto"`` honours the ``LELP_FAST_BACKEND`` environment variable, then picks the
compiled kernels for the device (``triton``, then ``cuda`` for CUDA tensors; ``cpu`` for CPU
tensors) and falls back to the ``torch`` reference path when none is available. Triton runs on
CPU tensors only when forced and ``TRITON_INTERPRET=1`` (the interpreter, for tests).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")

try:  # the compiled extension is optional at import time: the torch path always works
    from .. import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = exc


# The compiled extension's dtype codes (csrc/include/lelp/row_math.h: enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def rows_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself when each row is contiguous (the kernels take a row stride), else a contiguous copy."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def extension():
    """The compiled module ``lelp_fast._C``, or None when it failed to import."""
    return _C


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run on tensors of ``device``."""
    if backend == "torch":
        return True
    if backend == "triton":
        if device.type == "cuda":
            return _triton_importable()
        return os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable()
    if _C is None:
        return False
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda" and bool(getattr(_C, "has_cuda", False))
    return False


def resolve(backend: str, device: torch.device) -> str:
    """Maps a requested backend to the one that will run, raising if a forced one cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("LELP_FAST_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"LELP_FAST_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        # Not measured on a GPU yet: Triton (tiled, tensor-core dot) ahead of the baseline CUDA kernels.
        candidates = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        for candidate in candidates:
            if available(candidate, device):
                return candidate
        return "torch"
    if not available(backend, device):
        why = f" (extension failed to import: {_IMPORT_ERROR})" if _C is None else ""
        raise RuntimeError(
            f"backend {backend!r} is unavailable for tensors on {device}{why}; "
            "use backend='auto' or 'torch'"
        )
    return backend
