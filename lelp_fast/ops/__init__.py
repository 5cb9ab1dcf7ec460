"""Fused LELP ops with backend dispatch (torch reference, C++ CPU, CUDA)."""

from .targets import lelp_targets

__all__ = ["lelp_targets"]
