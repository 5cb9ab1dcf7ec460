"""Large CPU output tensors whose memory stays mapped from one step to the next.

A fresh CPU tensor of 32 MiB or more comes from ``mmap`` (glibc gives blocks that large back to the
OS when they are freed), so each training step's gradient of that size pays a page fault per 4 KiB
on its first write: 38 ms for 262 144 x 128 fp32 on the benchmark machine, where writing the same
bytes into memory already mapped takes 6 ms. The loss takes its gradient from here instead. A block
is handed out again only when no tensor made from it is alive (the block's reference count), so a
gradient that autograd or the caller still holds is never written over; such a call gets another
block. At most ``MAX_BLOCKS`` blocks are kept (the least recently used one goes);
:func:`release` frees them.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import List, Sequence

import numpy as np
import torch

MIN_BYTES = 32 << 20  # below glibc's largest mmap threshold, freed blocks stay in the heap anyway
MAX_BLOCKS = 2  # e.g. a training batch and an epoch's shorter last batch
ALIGN = 64  # bytes, as torch's CPU allocator aligns (whole AVX-512 vectors)

_blocks: List[np.ndarray] = []  # least recently used first
_lock = threading.Lock()


def _unused(index: int) -> bool:
    # References to a block nothing uses: the list's and getrefcount's own argument; a live tensor
    # made by torch.frombuffer holds one more (its buffer view).
    return sys.getrefcount(_blocks[index]) == 2


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, from a kept block when it is large and on the CPU."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < MIN_BYTES:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    with _lock:  # taking a block and making its tensor is one step for concurrent callers
        index = next((i for i in range(len(_blocks)) if _blocks[i].nbytes == nbytes + ALIGN and _unused(i)), None)
        if index is None:
            block = np.empty(nbytes + ALIGN, dtype=np.uint8)
            unused = [i for i in range(len(_blocks)) if _unused(i)]  # least recently used first
            for i in sorted(unused[:max(0, len(_blocks) + 1 - MAX_BLOCKS)], reverse=True):
                del _blocks[i]
        else:
            block = _blocks.pop(index)
        _blocks.append(block)
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
