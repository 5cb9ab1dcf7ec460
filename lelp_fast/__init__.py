"""lelp_fast: fast LELP knowledge distillation (Loo, Iliopoulos, Hu, Vee 2024).

Public API: :class:`LELPProjector` (fit, targets, save/load), :class:`LELPLoss`,
:func:`class_logits`, fidelity metrics :func:`agreement` and :func:`predictive_kl`, the
fused op :func:`lelp_targets`, and offline targets: :func:`generate_targets` writes them
(sharded, resumable, distributed), :func:`store_teacher_outputs` stores plain teacher outputs the
same way, :class:`TargetsDataset` reads either back for training.
"""

from . import capture as _capture  # noqa: F401 - registers capture directories as an embedding source
from .loss import LELPLoss
from .metrics import agreement, predictive_kl
from .offline import TargetsDataset, collate_with_targets, generate_targets, store_teacher_outputs
from .ops import lelp_targets
from .projector import LELPProjector, __version__
from .reference import class_logits

__all__ = [
    "LELPProjector",
    "LELPLoss",
    "class_logits",
    "agreement",
    "predictive_kl",
    "lelp_targets",
    "generate_targets",
    "TargetsDataset",
    "collate_with_targets",
    "store_teacher_outputs",
    "__version__",
]
