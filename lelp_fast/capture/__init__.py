"""Stage 1 of the user's path: run a teacher over data and store embeddings, logits, labels, head."""

from .runner import capture, find_head
from .source import CaptureDataset, CaptureSource

__all__ = ["capture", "find_head", "CaptureDataset", "CaptureSource"]
