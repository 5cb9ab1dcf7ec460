"""Host -> GPU copies that overlap compute: reusable pinned buffers, a side stream, one chunk ahead.

A GPU fit or offline run reads its chunks on the host. ``tensor.pin_memory().to(device)`` pays a
pinned allocation (a page-locking system call) per chunk, and its copy waits behind the previous
chunk's compute. Here each chunk's tensors go through one of a few pinned buffers that are reused,
the copy runs on a side stream and is issued for chunk i + 1 before chunk i is handed to the
compute, so the copy engine and the SMs work at the same time. The compute stream waits for a
chunk's copy with an event, never the host.

On the CPU (for tests) the same bookkeeping runs with plain buffers and cloned outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

_ALIGN = 256  # byte offset of each tensor inside a staging buffer (any dtype's alignment)


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class Staged:
    """The device copies of one item's tensors, and the event that marks their copy done."""

    tensors: List[Optional[torch.Tensor]]
    event: Optional["torch.cuda.Event"]
    device: torch.device

    def wait(self) -> List[Optional[torch.Tensor]]:
        """The tensors, usable on the current stream (which waits for the copy on the GPU, not the host)."""
        if self.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.event)
            for t in self.tensors:
                if t is not None:
                    t.record_stream(current)  # allocated on the side stream, freed only after use on this one
        return self.tensors


class PinnedStager:
    """Copies groups of host tensors to ``device`` through ``slots`` reusable (pinned) buffers.

    A slot is refilled only after its previous copy has finished reading it (its event), so up to
    ``slots`` copies can be in flight. Buffers grow to the largest chunk seen and are kept.
    """

    def __init__(self, device, slots: int = 3):
        if slots < 2:
            raise ValueError(f"slots must be >= 2 (one copying while one is refilled), got {slots}")
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.on_gpu else None
        self.buffers: List[Optional[torch.Tensor]] = [None] * slots
        self.copied: List[Optional[Any]] = [None] * slots  # event: the slot's last copy is done
        self.next_slot = 0
        self.allocations = 0  # buffers allocated so far (grown, never per chunk once warm)

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # its last copy is still reading it
        buf = self.buffers[slot]
        if buf is None or buf.numel() < nbytes:
            grown = nbytes if buf is None else max(nbytes, buf.numel() * 5 // 4)
            buf = torch.empty(grown, dtype=torch.uint8, pin_memory=self.on_gpu)
            self.buffers[slot] = buf
            self.allocations += 1
        return buf

    def copy(self, tensors: Sequence[Optional[torch.Tensor]]) -> Staged:
        """Starts the copy of ``tensors`` (None entries stay None); returns before it finishes on a GPU."""
        slot = self.next_slot
        self.next_slot = (slot + 1) % len(self.buffers)
        sizes = [0 if t is None else _aligned(t.numel() * t.element_size()) for t in tensors]
        buf = self._buffer(slot, sum(sizes))
        views: List[Optional[torch.Tensor]] = []
        offset = 0
        for t, size in zip(tensors, sizes):
            if t is None:
                views.append(None)
                continue
            nbytes = t.numel() * t.element_size()
            view = buf[offset:offset + nbytes].view(t.dtype).view(t.shape)
            view.copy_(t)  # pageable -> pinned, on the host
            views.append(view)
            offset += size
        if not self.on_gpu:
            return Staged([None if v is None else v.clone() for v in views], None, self.device)
        with torch.cuda.stream(self.stream):
            out = [None if v is None else v.to(self.device, non_blocking=True) for v in views]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copied[slot] = event
        return Staged(out, event, self.device)


def stage_ahead(items: Iterable[Tuple[Any, Sequence[Optional[torch.Tensor]]]], device,
                slots: int = 3) -> Iterator[Tuple[Any, List[Optional[torch.Tensor]]]]:
    """Yields ``(key, tensors on device)`` for each ``(key, host tensors)`` of ``items``, in order.

    The copy of item i + 1 is started before item i is yielded, so it overlaps whatever the caller
    does with item i. (Reading item i + 1 early also means its errors surface before item i is used.)
    """
    stager = PinnedStager(device, slots)
    pending: Optional[Tuple[Any, Staged]] = None
    for key, tensors in items:
        staged = (key, stager.copy(tensors))
        if pending is not None:
            yield pending[0], pending[1].wait()
        pending = staged
    if pending is not None:
        yield pending[0], pending[1].wait()
