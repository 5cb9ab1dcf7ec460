"""The quality benchmark: every distillation method on download-free tasks, several seeds.

Toy tasks (MLP teachers, :mod:`.runner`) and real data (a CNN or WordLlama teacher, students of
several capacities, paired differences against tuned KD; :mod:`.real_runner`)."""

from .datasets import DATASETS, hierarchical
from .models import MLP
from .real_data import REAL_TASKS
from .real_runner import (REAL_METHODS, STUDENT_KINDS, RealQualityConfig, format_real_markdown, real_config,
                          run_real_quality)
from .runner import METHODS, QualityConfig, format_markdown, run_quality

__all__ = ["DATASETS", "hierarchical", "MLP", "METHODS", "QualityConfig", "format_markdown", "run_quality",
           "REAL_TASKS", "REAL_METHODS", "STUDENT_KINDS", "RealQualityConfig", "format_real_markdown", "real_config",
           "run_real_quality"]
