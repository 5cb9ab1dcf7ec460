"""Backend selection: the fastest available backend for a tensor's device, or a forced one.

``backend="auto"`` honours the ``LELP_FAST_BACKEND`` environment variable, then picks the
compiled kernels for the device (``triton``, then ``cuda`` for CUDA tensors; ``cpu`` for CPU
tensors) and falls back to the ``torch`` reference path when none is available. Triton runs on
CPU tensors only when forced and ``TRITON_INTERPRET=1`` (the interpreter, for tests).
"""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Mapping, Optional

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


# Measured on an H100 80GB HBM3 (torch 2.11, CUDA 13.0, Triton 3.6) on 2026-11-25 at commit 55c4795
# (issue 12): the Triton kernels beat the CUDA kernels in every cell, e.g. targets 4 M x 768, K = 16
# bf16: triton 13.4 ms vs cuda 65.7 ms; loss K = 128 bf16 fwd+bwd: 5.95 vs 41.6 ms. Not re-measured
# since the Triton and CUDA kernels were rewritten (2026-11-26, no GPU lent); benchmarks/bench_gpu.py
# re-measures both, and this order should follow its tables.
GPU_PREFERENCE = ("triton", "cuda")


def resolve(backend: str, device: torch.device, unsupported: Mapping[str, str] = MappingProxyType({})) -> str:
    """Maps a requested backend to the one that will run, raising if a forced one cannot.

    ``unsupported`` maps a backend to why it cannot run this particular call (a shape or option it
    lacks): ``auto`` skips it, a forced one raises with that reason. ``auto`` never picks a backend
    that cannot run the op.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("LELP_FAST_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"LELP_FAST_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        candidates = GPU_PREFERENCE if device.type == "cuda" else ("cpu",)
        for candidate in candidates:
            if candidate not in unsupported and available(candidate, device):
                return candidate
        return "torch"
    if backend in unsupported:
        raise ValueError(f"backend {backend!r} cannot run this call: {unsupported[backend]}; use backend='auto'")
    if not available(backend, device):
        why = f" (extension failed to import: {_IMPORT_ERROR})" if _C is None else ""
        raise RuntimeError(
            f"backend {backend!r} is unavailable for tensors on {device}{why}; "
            "use backend='auto' or 'torch'"
        )
    return backend
