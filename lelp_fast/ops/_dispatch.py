"""Backend selection: the fastest available backend for a tensor's device, or a forced one.

``backend="auto"`` honours the ``LELP_FAST_BACKEND`` environment variable, then picks the
compiled kernels for the device (``triton``, then ``cuda`` for CUDA tensors; ``cpu`` for CPU
tensors) and falls back to the ``torch`` reference path when none is available or none takes the
call's shape. Triton runs on CPU tensors only when forced and ``TRITON_INTERPRET`` is on (the
interpreter, for tests). A GPU launch that fails for resources (Triton's ``OutOfResources``, CUDA's
``cudaErrorLaunchOutOfResources``) under ``auto`` is recorded with one warning naming the shape, and
that shape goes to the next backend.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from types import MappingProxyType
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch.utils import _python_dispatch

from ..kernels.triton import interpreting as triton_interpreting

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")

try:  # the compiled extension is optional at import time: the torch path always works
    from .. import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = exc


# The Python function of each custom op made by ``custom_op``: what ``eager`` calls past the dispatcher.
_PYTHON_FUNCTIONS: Dict[object, Callable] = {}


def custom_op(name: str, mutates_args=()):
    """``torch.library.custom_op(name, mutates_args=...)`` as a decorator that also keeps the function
    it wraps, for ``eager``."""
    def register(fn: Callable):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        _PYTHON_FUNCTIONS[op] = fn
        return op
    return register


def eager(op, *tensors) -> Callable:
    """``op`` (made by ``custom_op``), or the Python function it wraps where nothing could tell them
    apart: eager mode, no dispatch mode active (fake tensors, tracing, a mode that watches calls) and
    plain tensors among ``tensors`` (lists of them too; no subclass, no functorch wrapper). The
    dispatcher's layers (the op's autograd and redispatch, the outputs' aliasing check) took 0.05 ms
    of a small loss step's 0.18 ms on a 2-core CPU (fwd + bwd, 256 x 16; docs/benchmarks.md); the op
    is there for ``torch.compile`` and CUDA graphs to see one call (issue 21: the loss's host time)."""
    if torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None:
        return op
    for t in _flat(tensors):
        if type(t) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return op
    return _PYTHON_FUNCTIONS[op]


def _flat(items):
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flat(item)
        elif item is not None:
            yield item


# The compiled extension's dtype codes (csrc/include/lelp/row_math.h: enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# csrc/cuda/targets.cu and csrc/cuda/loss.cu hold a row of K = C*S values per warp (16 per lane at
# most) and throw beyond it; auto sends wider rows to the next backend.
CUDA_MAX_K = 512
# csrc/include/lelp/warp_loss.h: kMaxOnlineTeachers (the teachers' maps are a kernel parameter).
CUDA_MAX_ONLINE_TEACHERS = 8


def cuda_unsupported(num_classes: int, n_subclasses: int, online_teachers: int = 0) -> Optional[str]:
    """Why the CUDA kernels cannot take this shape (or this many online teachers), or None."""
    k = num_classes * n_subclasses
    if k > CUDA_MAX_K:
        return f"it takes K = C*S <= {CUDA_MAX_K} (got {k})"
    if online_teachers > CUDA_MAX_ONLINE_TEACHERS:
        return (f"it takes at most {CUDA_MAX_ONLINE_TEACHERS} online teachers (got {online_teachers}; "
                "precomputed targets take any number)")
    return None


# (backend, shape description) -> why: launches that failed for resources in this process.
_LAUNCH_FAILURES: Dict[Tuple[str, str], str] = {}


# cudaErrorLaunchOutOfResources as csrc/cuda's launchers report it (cudaGetErrorString's text).
CUDA_OUT_OF_RESOURCES = "too many resources requested for launch"


def is_out_of_resources(exc: BaseException) -> bool:
    """Triton's OutOfResources (shared memory or registers over the device's limit), matched by
    name so this module imports without triton; or a CUDA kernel's launch refused for its registers
    or threads (cudaErrorLaunchOutOfResources)."""
    return type(exc).__name__ == "OutOfResources" or (isinstance(exc, RuntimeError)
                                                       and CUDA_OUT_OF_RESOURCES in str(exc))


def record_launch_failure(backend: str, shape: str, exc: BaseException) -> None:
    """Remembers that ``backend`` cannot launch ``shape`` here and warns once for it."""
    if (backend, shape) in _LAUNCH_FAILURES:
        return
    _LAUNCH_FAILURES[(backend, shape)] = f"its launch failed for resources at {shape}"
    warnings.warn(f"lelp_fast: the {backend} kernel cannot launch {shape} on this device ({exc}); this shape "
                  "falls back to the next backend from now on", RuntimeWarning, stacklevel=3)


def falls_back(backend: str) -> bool:
    """Whether a failed launch may go to the next backend: only when the user (and the environment)
    let auto choose; a forced backend raises instead."""
    return backend == "auto" and os.environ.get("LELP_FAST_BACKEND", "auto") in ("", "auto")


def launch_failures(shape: Union[str, Callable[[], str]]) -> Dict[str, str]:
    """{backend: why} for the backends whose launch failed for ``shape`` (see record_launch_failure).
    ``shape`` may be a function making the key: every call of an op asks, and almost always no
    launch has failed, so the key is only built once one has."""
    if not _LAUNCH_FAILURES:
        return {}
    key = shape() if callable(shape) else shape
    return {backend: why for (backend, failed), why in _LAUNCH_FAILURES.items() if failed == key}


def launch_device(t: torch.Tensor):
    """A context in which ``t``'s GPU is the current device: Triton and the CUDA kernels launch on the
    current device, so a tensor on another GPU (``cuda:1`` while ``cuda:0`` is current) would be read
    by the wrong one. Nothing for tensors off the GPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


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
        return triton_interpreting() and _triton_importable()
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


def auto_candidates(device: torch.device) -> Tuple[str, ...]:
    """The compiled backends auto tries for ``device``, best first; torch comes after them all."""
    return GPU_PREFERENCE if device.type == "cuda" else ("cpu",)


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
        for candidate in auto_candidates(device):
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
