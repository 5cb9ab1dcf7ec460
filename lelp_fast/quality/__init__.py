"""The quality benchmark: every distillation method on download-free tasks, several seeds."""

from .datasets import DATASETS, hierarchical
from .runner import METHODS, QualityConfig, format_markdown, run_quality

__all__ = ["DATASETS", "hierarchical", "METHODS", "QualityConfig", "format_markdown", "run_quality"]
