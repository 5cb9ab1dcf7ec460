"""Fixes of two Triton interpreter defects, for tests and CPU logic checks only (Triton 3.6 and
3.9, ``InterpreterBuilder``); real GPUs are unaffected and the kernels are the same code either way.

* Its ``tl.dot`` multiplies bf16 operands as the uint16 bit patterns it stores them in
  (``create_dot``), so bf16 dots come out ~1e10 off. A bf16's bits shifted left by 16 are its exact
  fp32 value, and products of bf16 are exact in fp32, so the patched dot computes what the tensor
  cores do.
* Its fp32 -> bf16 cast (``cast_impl``, which ``.to(tl.bfloat16)`` reaches through
  ``create_fp_trunc``) truncates the mantissa, where a GPU rounds to nearest even
  (``cvt.rn.bf16.f32``, Triton's default): 4x the error bound of the fp32 targets' bf16 split
  (``targets._split_h``; measured on their targets, 2.3x). The patched cast rounds as the GPU does.
  Casts with an explicit rounding mode (``create_fp_to_fp``) keep the interpreter's rounding.
"""

import numpy as np


def _bf16_as_fp32(handle):
    import triton.language as tl

    if handle.dtype.scalar == tl.bfloat16 or handle.dtype == tl.bfloat16:
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 values as bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN (quiet)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded.reshape(np.shape(x))


def patch_interpreter():
    """Idempotently wraps the interpreter's dot (bf16 operands read as numbers) and its fp32 -> bf16
    cast (rounded to nearest even)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_lelp_patched", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_data, b_data = _bf16_as_fp32(a), _bf16_as_fp32(b)
        if a_data is a.data and b_data is b.data:
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(a_data, b_data, dtype=d.data.dtype) + d.data
        return interpreter.TensorHandle(out, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(fp32_to_bf16_bits(src.data), dst_type.scalar)
        return original_cast(self, src, dst_type)

    create_dot._lelp_patched = True
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
