"""lelp_fast: fast LELP knowledge distillation (Loo, Iliopoulos, Hu, Vee 2024).

Public API: :class:`LELPProjector` (fit, targets, save/load), :class:`LELPLoss`,
:func:`class_logits`, fidelity metrics :func:`agreement` and :func:`predictive_kl`, and the
fused op :func:`lelp_targets`.
"""

from .loss import LELPLoss
from .metrics import agreement, predictive_kl
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
    "__version__",
]
