"""Python-side GPU kernels (Triton)."""
