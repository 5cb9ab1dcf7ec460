"""Offline target generation (sharded, resumable, distributed) and training from stored targets."""

from .dataset import TargetsDataset, batch_loader, collate_with_targets, gather_rows
from .pipeline import generate_targets
from .teacher_store import store_teacher_outputs

__all__ = ["TargetsDataset", "batch_loader", "collate_with_targets", "gather_rows", "generate_targets",
           "store_teacher_outputs"]
