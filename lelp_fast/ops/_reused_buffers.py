"""Large CPU output tensors whose memory stays mapped from one step to the next.

A fresh CPU tensor of 32 MiB or more comes from ``mmap`` (glibc gives blocks that large back to the
OS when they are freed), so each training step's gradient of that size pays a page fault per 4 KiB
on its first write: 38 ms for 262 144 x 128 fp32 on the benchmark machine, where writing the same
bytes into memory already mapped takes 6 ms. The loss takes its gradient from here instead. A block
is handed out again only when no tensor made from it is alive (the block's reference count), so a
gradient that autograd or the caller still holds is never written over; such a call gets another
block. Unused blocks beyond ``MAX_BLOCKS`` go (the least recently used first), and none over
``MAX_BLOCK_BYTES`` is kept; :func:`release` (``lelp_fast.ops.release_reused_buffers``) frees them
all, and ``LELP_FAST_REUSE_BUFFERS=0`` turns reuse off. Reuse is also off when this Python does
not count references as assumed (checked at import).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import List, Sequence

import numpy as np
import torch

MIN_BYTES = 32 << 20  # below glibc's largest mmap threshold, freed blocks stay in the heap anyway
MAX_BLOCK_BYTES = 1 << 30  # a larger gradient (say one evaluation of millions of rows) is not kept
MAX_BLOCKS = 2  # e.g. a training batch and an epoch's shorter last batch
ALIGN = 64  # bytes, as torch's CPU allocator aligns (whole AVX-512 vectors)

_blocks: List[np.ndarray] = []  # least recently used first
_lock = threading.Lock()


def _unused(index: int) -> bool:
    # References to a block nothing uses: the list's and getrefcount's own argument; a live tensor
    # made by torch.frombuffer holds one more (its buffer view). _counts_hold() checks this at import.
    return sys.getrefcount(_blocks[index]) == 2


def _counts_hold() -> bool:
    """Whether this Python and torch count references as ``_unused`` assumes (else nothing is reused)."""
    _blocks.append(np.empty(ALIGN, dtype=np.uint8))
    try:
        free_before = _unused(0)
        view = torch.frombuffer(_blocks[0], dtype=torch.uint8)
        held = not _unused(0)
        del view
        return free_before and held and _unused(0)
    finally:
        _blocks.clear()


ENABLED = os.environ.get("LELP_FAST_REUSE_BUFFERS", "1") != "0" and _counts_hold()


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, from a kept block when it is large and on the CPU."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if not ENABLED or torch.device(device).type != "cpu" or not MIN_BYTES <= nbytes <= MAX_BLOCK_BYTES:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    with _lock:  # taking a block and making its tensor is one step for concurrent callers
        index = next((i for i in range(len(_blocks)) if _blocks[i].nbytes == nbytes + ALIGN and _unused(i)), None)
        block = _blocks.pop(index) if index is not None else np.empty(nbytes + ALIGN, dtype=np.uint8)
        _blocks.append(block)
        unused = [i for i in range(len(_blocks) - 1) if _unused(i)]  # least recently used first
        for i in sorted(unused[:max(0, len(_blocks) - MAX_BLOCKS)], reverse=True):
            del _blocks[i]
        offset = (-block.ctypes.data) % ALIGN
        return torch.frombuffer(block, dtype=dtype, offset=offset, count=numel).view(tuple(shape))


def release() -> None:
    """Drops the kept blocks (their memory goes back to the OS once no tensor made from them is alive)."""
    with _lock:
        _blocks.clear()


def kept_bytes() -> int:
    """The bytes of the blocks kept now."""
    with _lock:
        return sum(b.nbytes for b in _blocks)
