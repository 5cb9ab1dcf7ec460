"""Distillation methods next to LELP, on the same fused ops where they apply (docs/algorithm.md).

- :mod:`.kd`: vanilla KD (Hinton) and the f-divergence family as a module.
- :mod:`.annealing`: Annealing-KD (Jafari et al. 2021) as a schedule usable in any loop.
- :mod:`.multi_teacher`: uniform, fixed, AMTML-KD-style instance weights, reinforced selection.
- :mod:`.subclasses`: pseudo-subclass variants: random projections, k-means (faiss), oracle.
"""

from .annealing import AnnealingKD
from .kd import KDLoss, kd_log_targets
from .multi_teacher import InstanceTeacherWeights, ReinforcedTeacherSelector, fixed_weights, uniform_weights
from .subclasses import KMeansSubclasses, RandomProjectionSubclasses, oracle_coordinates, subclass_log_targets

__all__ = [
    "AnnealingKD", "KDLoss", "kd_log_targets", "InstanceTeacherWeights", "ReinforcedTeacherSelector",
    "fixed_weights", "uniform_weights", "KMeansSubclasses", "RandomProjectionSubclasses", "oracle_coordinates",
    "subclass_log_targets",
]
