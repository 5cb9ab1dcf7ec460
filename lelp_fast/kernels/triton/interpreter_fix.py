"""Fix of a Triton interpreter defect, for tests and CPU logic checks only: its ``tl.dot``
multiplies bf16 operands as the
uint16 bit patterns it stores them in (Triton 3.9, ``InterpreterBuilder.create_dot``), so bf16 dots
come out ~1e10 off. A bf16's bits shifted left by 16 are its exact fp32 value, and products of bf16
are exact in fp32, so the patched dot computes what the tensor cores do. Real GPUs are unaffected;
the kernels are the same code either way.
"""

import numpy as np


def _bf16_as_fp32(handle):
    import triton.language as tl

    if handle.dtype.scalar == tl.bfloat16 or handle.dtype == tl.bfloat16:
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data


def patch_bf16_dot():
    """Idempotently wraps the interpreter's dot so bf16 operands are read as numbers."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_lelp_patched", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_data, b_data = _bf16_as_fp32(a), _bf16_as_fp32(b)
        if a_data is a.data and b_data is b.data:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(a_data, b_data, dtype=d.data.dtype) + d.data
        return interpreter.TensorHandle(out, d.dtype.scalar)

    create_dot._lelp_patched = True
    builder.create_dot = create_dot
