"""Streaming fit (docs/algorithm.md, streaming fit): per-class statistics, exact or sketched, and the engine that feeds them."""

from .engine import FitResult, FitSettings, accumulate, choose_method
from .exact import ExactClassStatistics
from .sketch import SketchClassStatistics

__all__ = [
    "ExactClassStatistics",
    "FitResult",
    "FitSettings",
    "SketchClassStatistics",
    "accumulate",
    "choose_method",
]
