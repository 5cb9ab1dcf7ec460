"""Fused LELP ops with backend dispatch (torch reference, C++ CPU, CUDA)."""

from ._reused_buffers import release as release_reused_buffers
from .loss import distill_loss
from .targets import lelp_targets

__all__ = ["distill_loss", "lelp_targets", "release_reused_buffers"]
