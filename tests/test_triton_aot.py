"""Every Triton kernel variant the launchers can produce, compiled ahead of time for sm_80 and sm_90
on this (GPU-less) machine, with what the design promises read from the PTX.

The interpreter (``TRITON_INTERPRET=1``, tests/test_triton.py) runs Python that real Triton
refuses (a plain-float global read inside ``@triton.jit`` compiled nowhere on a GPU): compiling is
the only check of that here. The compiles run in a process pool, once per session.
"""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from lelp_fast.kernels.triton import aot  # noqa: E402
from lelp_fast.kernels.triton import loss as loss_kernels  # noqa: E402
from lelp_fast.kernels.triton import targets as targets_kernels  # noqa: E402

# (student, targets) dtypes per arch: bf16 on both; fp32 (the other load width) on sm_90.
LOSS_DTYPES = {80: [("bf16", "bf16")], 90: [("bf16", "bf16"), ("fp32", "fp32")]}
CASES = (
    [("targets", i, arch, None) for i in range(len(targets_kernels.VARIANTS)) for arch in aot.ARCHS]
    + [("loss", i, arch, dts) for i in range(len(loss_kernels.VARIANTS)) for arch in aot.ARCHS
       for dts in LOSS_DTYPES[arch]]
)


def _case_id(case):
    op, i, arch, dts = case
    if op == "targets":
        v = targets_kernels.VARIANTS[i]
        c = v["constexprs"]
        return (f"targets-sm{arch}-{v['dtype']}-n{c['BLOCK_N']}d{c['BLOCK_D']}w{v['config'].num_warps}-"
                f"{c['C_PAD']}x{c['S_PAD']}-{'logits' if c['HAS_LOGITS'] else 'head'}-{'exact' if c['EXACT'] else 'pad'}")
    c = loss_kernels.VARIANTS[i]["constexprs"]
    return (f"loss-sm{arch}-{dts[0]}-K{c['K']}-div{c['DIVERGENCE']}-{'w' if c['HAS_WEIGHTS'] else 'nw'}-"
            f"{'y' if c['HAS_LABELS'] else 'ny'}")


def _compile(case):
    """(facts, None) or (None, error text); runs in a worker process."""
    op, i, arch, dts = case
    try:
        if op == "targets":
            v = targets_kernels.VARIANTS[i]
            ptx = aot.compile_ptx(targets_kernels.lelp_targets_kernel, targets_kernels.signature(v["dtype"]),
                                  v["constexprs"], arch, v["config"].num_warps, v["config"].num_stages)
        else:
            v = loss_kernels.VARIANTS[i]
            ptx = aot.compile_ptx(loss_kernels.lelp_loss_kernel, loss_kernels.signature(*dts), v["constexprs"], arch,
                                  v["num_warps"])
        return aot.ptx_facts(ptx), None
    except Exception as exc:  # noqa: BLE001 - reported per variant by the test
        return None, f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def compiled():
    """Compiles in fresh (spawned) processes without TRITON_INTERPRET: test_triton.py sets it for
    this process, where the kernels are then interpreter functions that cannot be compiled."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            return dict(zip(CASES, pool.map(_compile, CASES, chunksize=4)))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_variant_compiles_without_spills(compiled, case):
    facts, error = compiled[case]
    assert error is None, error
    assert facts["local"] == 0, f"local-memory traffic (spills): {facts}"


TARGETS = [c for c in CASES if c[0] == "targets"]


@pytest.mark.parametrize("case", TARGETS, ids=[_case_id(c) for c in TARGETS])
def test_targets_kernel_uses_tensor_cores_and_wide_copies(compiled, case):
    facts, error = compiled[case]
    assert error is None, error
    tensor_core = facts["wgmma"] if case[2] >= 90 else facts["mma"]
    assert tensor_core > 0, f"no tensor-core instruction for sm_{case[2]}: {facts}"
    assert facts["async_copies"] > 0, f"dot operands not staged by 16-byte async copies: {facts}"
    if targets_kernels.VARIANTS[case[1]]["constexprs"]["EXACT"]:
        assert facts["vector_stores"] > 0, f"whole-row stores not vectorised: {facts}"


ALIGNED_LOSS = [c for c in CASES if c[0] == "loss" and loss_kernels.VARIANTS[c[1]]["constexprs"]["K"] % 8 == 0]


@pytest.mark.parametrize("case", ALIGNED_LOSS, ids=[_case_id(c) for c in ALIGNED_LOSS])
def test_loss_kernel_loads_rows_in_vectors(compiled, case):
    facts, error = compiled[case]
    assert error is None, error
    assert facts["vector_loads"] > 0 and facts["vector_stores"] > 0, f"scalar row loads/stores: {facts}"
