"""Tensors as the gates compile the kernels for them (tests/test_triton_aot.py). Triton's JIT compiles a
kernel apart for a pointer that is not on 16 bytes and for a row stride of another kind than contiguous
rows have (``limits.jit_kind``: 1, a multiple of 16, or neither), and the gates compile only the
launches of fresh allocations (torch's are on 16 bytes or more) with contiguous rows. So the launchers
pass views that are neither as copies (inputs) or write them through a contiguous buffer (outputs):
one more pass over such a tensor, where the kernel for it would be one no gate had compiled."""

from __future__ import annotations

from typing import Optional

import torch

from . import limits

ALIGNMENT = 16  # bytes: the JIT's divisibility hint on a pointer


def as_gated(t: torch.Tensor, columns: Optional[int] = None) -> bool:
    """Whether the JIT compiles ``t`` as the gates do: its first element on ``ALIGNMENT`` bytes and, for a
    kernel that takes its row stride, that stride of the kind of ``columns`` (contiguous rows)."""
    if t.data_ptr() % ALIGNMENT:
        return False
    return columns is None or limits.jit_kind(t.stride(0)) == limits.jit_kind(columns)


def gated_input(t: Optional[torch.Tensor], columns: Optional[int] = None) -> Optional[torch.Tensor]:
    """``t`` itself where ``as_gated``, else a copy in a new allocation with contiguous rows."""
    if t is None or as_gated(t, columns):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def gated_output(out: torch.Tensor, columns: Optional[int] = None) -> torch.Tensor:
    """``out`` itself where ``as_gated``, else a new buffer of its shape and dtype for the kernel to fill
    (``finish_output`` copies it into ``out``)."""
    if as_gated(out, columns):
        return out
    return torch.empty(out.shape, dtype=out.dtype, device=out.device)


def finish_output(written: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` holding what the kernel wrote into ``written`` (``gated_output``'s buffer, or ``out``)."""
    if written is not out:
        out.copy_(written)
    return out
