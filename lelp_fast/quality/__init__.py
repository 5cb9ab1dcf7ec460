"""The quality benchmark: every distillation method on download-free tasks, several seeds."""

from .datasets import DATASETS, hierarchical
from .models import MLP
from .runner import METHODS, QualityConfig, format_markdown, run_quality

__all__ = ["DATASETS", "hierarchical", "MLP", "METHODS", "QualityConfig", "format_markdown", "run_quality"]
