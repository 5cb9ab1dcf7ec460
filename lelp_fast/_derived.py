"""Values derived from a tensor (a kernel's split map), cached per tensor and kept for its newest version.

Keyed by ``id()`` with a weak reference that drops the entry with the tensor (a WeakKeyDictionary
would compare tensors with ``==``, elementwise). The version counters of the tensor and of the
tensors it is combined with catch in-place changes (``copy_``, ``load_state_dict``, an optimiser
step): the value is remade and replaces the old one, so a weight edited in place keeps one entry.
"""

from __future__ import annotations

import weakref
from typing import Callable, Hashable, TypeVar

import torch

T = TypeVar("T")
_ENTRIES: dict = {}


def derived(owner: torch.Tensor, key: Hashable, make: Callable[[], T], *also: torch.Tensor) -> T:
    """``make()`` once per (``owner``, ``key``) while ``owner`` and the ``also`` tensors are the same
    objects at the same versions; inference-mode tensors (no version counter) are not cached."""
    try:
        stamp = tuple(t._version for t in (owner, *also))
    except RuntimeError:
        return make()
    entry = _ENTRIES.get(id(owner))
    if entry is None or entry[0]() is not owner:
        oid = id(owner)
        entry = (weakref.ref(owner, lambda _, oid=oid: _ENTRIES.pop(oid, None)), {})
        _ENTRIES[oid] = entry
    hit = entry[1].get(key)
    if hit is not None and hit[0] == stamp and all(ref() is t for ref, t in zip(hit[1], also)):
        return hit[2]
    value = make()
    entry[1][key] = (stamp, tuple(weakref.ref(t) for t in also), value)
    return value


def cached_count(owner: torch.Tensor) -> int:
    """How many values are held for ``owner`` (tests: an in-place edit replaces, never adds)."""
    entry = _ENTRIES.get(id(owner))
    return 0 if entry is None or entry[0]() is not owner else len(entry[1])


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: ``t`` itself when it is there, else a copy made once per version of ``t``.
    A projector kept on the CPU and used on a GPU every step is copied once, not per step, so the
    kernels' caches keyed on the copy (the split map) hit too. Under inference mode or a fake-tensor
    trace the copy is made and not kept: it would be an inference or fake tensor, handed back to
    every later call."""
    if t.device == device:
        return t
    if torch.is_inference_mode_enabled() or torch._guards.detect_fake_mode() is not None:
        return t.to(device)
    return derived(t, ("on", str(device)), lambda: t.detach().to(device))
