"""Triton kernels, one file per op. Imported lazily: triton is an optional dependency."""
