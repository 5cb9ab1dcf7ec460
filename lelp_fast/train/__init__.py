"""Stage 4 of the user's path: train a student from stored LELP targets (``distill``)."""

from .loop import OnlineTargets, TrainSettings, distill, evaluate, load_student

__all__ = ["OnlineTargets", "TrainSettings", "distill", "evaluate", "load_student"]
