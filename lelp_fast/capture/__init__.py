"""Stage 1 of the user's path: run a teacher over data and store embeddings, logits, labels, head."""

from .runner import capture, find_head
from .source import CaptureDataset, CaptureSource
from .text import capture_text  # transformers is imported only when it is called

__all__ = ["capture", "capture_text", "find_head", "CaptureDataset", "CaptureSource"]
