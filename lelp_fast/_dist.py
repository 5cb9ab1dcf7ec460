"""The few torch.distributed calls the long jobs share; every one is a no-op without a group."""

from __future__ import annotations


def default_group(process_group):
    """``process_group``, or under torchrun (an initialised group of several ranks) the default one:
    without it every rank took itself for the only one and wrote the same files (capture's ranks
    failed on each other's lock)."""
    if process_group is not None:
        return process_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def rank_world(process_group):
    """(rank, world size) in ``process_group``; (0, 1) without one."""
    if process_group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(process_group), dist.get_world_size(process_group)


def barrier(process_group) -> None:
    if process_group is not None:
        import torch.distributed as dist

        dist.barrier(process_group)
