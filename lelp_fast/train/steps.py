"""What one optimiser step of ``distill`` needs besides the loss: the device, mixed precision,
the learning-rate schedule, and the data-parallel split of a batch across ranks.

Data parallel (``torchrun``, or any initialised ``torch.distributed`` group; gloo on CPUs, NCCL
on GPUs): every rank draws the same global batch (the epoch's seeded order) and trains on its
contiguous share of it inside ``DistributedDataParallel``, with its mean loss weighted by its
share of the global rows; DDP's gradient average is then the one-process gradient of the whole
batch, so N ranks train the student one process would with the same global batch (up to the
order of floating-point sums).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
from torch import nn

from .._checks import require_device

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``"auto"``: this rank's GPU when there is one (``LOCAL_RANK`` under torchrun), else the CPU."""
    if device != "auto":
        return require_device("train.device (TrainSettings.device)", device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    import os

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at optimiser step ``i``: a linear warm-up from
    ``1 / (warmup_steps + 1)`` to 1, then constant, linear decay to 0, or a half cosine to 0."""
    def factor(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        done = (i - warmup_steps) / max(1, total_steps - warmup_steps)
        done = min(done, 1.0)
        return 1.0 - done if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def autocast(device: torch.device, precision: str):
    """The forward pass under ``torch.autocast`` in bf16/fp16, or a null context for ``"no"``."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class DataParallel:
    """This process's rank and world, and its share of each global batch (no-ops for one process)."""

    def __init__(self):
        import torch.distributed as dist

        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.rank == 0:  # one warning, not one a rank
            warn_unsynced_batchnorm(model, self.world)

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def share(self, rows: int) -> slice:
        """This rank's contiguous rows of a global batch of ``rows``."""
        return slice(rows * self.rank // self.world, rows * (self.rank + 1) // self.world)

    def loss_weight(self, mine: int, rows: int) -> float:
        """Scales this rank's mean loss so that DDP's average of the ranks' gradients is the
        gradient of the mean over the whole global batch."""
        return mine * self.world / rows

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (for the logged totals)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def warn_unsynced_batchnorm(model: nn.Module, world: int) -> None:
    """BatchNorm normalises each rank's share of a batch by that share's statistics (its running
    statistics are rank 0's), so N ranks do not train the student one process would (warned by rank 0)."""
    found = [name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)]
    if found:
        import warnings

        warnings.warn(f"the student's BatchNorm layers ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}) "
                      f"normalise each of the {world} ranks' share of a batch by its own statistics, so the "
                      "student differs from one process's; on GPUs, torch.nn.SyncBatchNorm.convert_sync_batchnorm"
                      "(student) before distill shares them", UserWarning, stacklevel=5)


def take(batch, part: slice, device: Optional[torch.device] = None):
    """Rows ``part`` of every tensor in a (nested) batch, moved to ``device``."""
    if torch.is_tensor(batch):
        batch = batch[part]
        return batch if device is None else batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(b, part, device) for b in batch)
    if isinstance(batch, dict):
        return {k: take(v, part, device) for k, v in batch.items()}
    return batch
