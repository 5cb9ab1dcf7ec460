"""FAST_MATH: whether the kernels take libdevice's one-MUFU functions (``ex2``/``lg2.approx.ftz``,
``div.approx``). Not under the interpreter (the CPU tests), which has no libdevice: there the
kernels take tl's accurate functions. Read once, when the kernels are first imported."""

import triton.language as tl

from . import interpreting

FAST_MATH = tl.constexpr(not interpreting())
