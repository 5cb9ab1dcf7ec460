"""The few torch.distributed calls the long jobs share; every one is a no-op without a group."""

from __future__ import annotations


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
