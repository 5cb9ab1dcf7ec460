"""Triton kernels, one file per op. Imported lazily: triton is an optional dependency."""

import os

# The values for which Triton reads an environment flag as on (its C++ getenv_bool, checked under
# Triton 3.6.0 and 3.9.0), case-insensitive.
_ON = ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET`` read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _ON
