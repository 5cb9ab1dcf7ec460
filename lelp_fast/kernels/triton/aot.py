"""Ahead-of-time compilation of the Triton kernels for a GPU this machine need not have.

``triton.compile`` lowers a kernel for a named target (``GPUTarget("cuda", 90, 32)``) without a
driver, so a CPU machine can check what the interpreter cannot: that real Triton accepts the code
(the interpreter runs Python that the compiler refuses) and what the PTX holds (tensor-core
``mma``/``wgmma``, no local-memory spills). Used by ``tests/test_triton_aot.py``.
"""

from __future__ import annotations

import re
from typing import Dict

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCHS = (80, 90)  # A100, H100/H200


def compile_ptx(kernel: triton.JITFunction, signature: Dict[str, str], constexprs: Dict[str, object], arch: int,
                num_warps: int = 4, num_stages: int = 3) -> str:
    """The PTX of ``kernel`` specialised on ``constexprs`` for sm_``arch``; raises what Triton raises."""
    # What the JIT specialises on for aligned inputs: 16-byte pointers, strides and d divisible by 16.
    aligned = [i for i, (name, kind) in enumerate(signature.items())
               if kind.startswith("*") or name.startswith("stride") or name == "D"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(kernel, signature, constexprs=dict(constexprs), attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


def ptx_facts(ptx: str) -> Dict[str, int]:
    """Counts of the instructions the design promises (or forbids) in a PTX listing."""
    return {
        "mma": len(re.findall(r"\bmma\.sync\b", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "local": len(re.findall(r"\b(?:ld|st)\.local\b", ptx)),
        # 16-byte asynchronous copies (the pipelined dot operands) and vector loads/stores
        "async_copies": len(re.findall(r"\bcp\.async\.cg\.shared\.global\b", ptx)),
        "vector_loads": len(re.findall(r"\bld\.global(?:\.[\w:]+)*\.v[248]\.", ptx)),
        "vector_stores": len(re.findall(r"\bst\.global(?:\.[\w:]+)*\.v[248]\.", ptx)),
        "scalar_stores": len(re.findall(r"\bst\.global(?:\.[\w:]+)*\.b(?:16|32)\b", ptx)),
    }
