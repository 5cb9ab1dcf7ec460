"""Stage 4 of the user's path: train a student from stored LELP targets (``distill``)."""

from .loop import TrainSettings, distill, evaluate, load_student

__all__ = ["TrainSettings", "distill", "evaluate", "load_student"]
