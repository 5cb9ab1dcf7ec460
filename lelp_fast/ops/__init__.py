"""Fused LELP ops with backend dispatch (torch reference, C++ CPU, CUDA)."""

from .loss import distill_loss
from .targets import lelp_targets

__all__ = ["distill_loss", "lelp_targets"]
