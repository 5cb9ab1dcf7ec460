"""Streaming fit statistics (DESIGN.md §2)."""

from .exact import ExactClassStatistics

__all__ = ["ExactClassStatistics"]
