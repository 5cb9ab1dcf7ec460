"""Offline target generation (sharded, resumable, distributed) and training from stored targets."""

from .dataset import TargetsDataset, collate_with_targets
from .pipeline import generate_targets

__all__ = ["TargetsDataset", "collate_with_targets", "generate_targets"]
