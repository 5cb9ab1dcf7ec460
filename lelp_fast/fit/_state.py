"""Shared by the statistics classes: moving their state between devices."""

from __future__ import annotations

import torch


def move_tensors(obj, device: torch.device):
    """Moves every tensor attribute of ``obj`` to ``device`` (the engine brings a GPU fit's state
    to the CPU for the eigensolver) and records the device."""
    for name, value in list(vars(obj).items()):
        if isinstance(value, torch.Tensor):
            setattr(obj, name, value.to(device))
    obj.device = torch.device(device)
    return obj
