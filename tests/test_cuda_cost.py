"""The CUDA loss kernel's modelled time (tests/cuda_cost.py), held to issue 21's loss budgets: at most
1.5x the floor on the H100 and H200, and at most 3 MUFU operations (EX2, LG2, RCP) per element (at
λ ≠ 1 per element of the bf16 floor's time, as the Triton gate of those paths: 6 in fp32). Runs
wherever nvcc is (no GPU needed). The kernel before the base-2 rewrite (one lane per 4 values, expf and logf) was
modelled at 1.1-12x the H200's floor on the λ = 1 paths and 2.9-51x on the λ ≠ 1 ones."""

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_cost  # noqa: E402

from lelp_fast.kernels.triton import cost  # noqa: E402

pytestmark = pytest.mark.skipif(cuda_cost.NVCC is None or shutil.which("g++") is None,
                                reason="nvcc or g++ not installed")

# λ ≠ 1 paths over the budget (modelled 2026-12-02, nvcc 13.0, sm_90; were 2.9-51x the H200's floor
# with a warp-wide pass over every class): S = 5 and 10 in bf16 (the class sums through shared memory,
# from each chunk's sums split at a class boundary: 1.8-2.5x on the H200). K = 128 in bf16 with the
# hard-label term (S = 8 and 16) came within it later on 2026-12-02 (1.70 -> 1.48x): the hard-label
# term a chunk at a time, the slots' class sums by a butterfly, the ignored rows' zero a factor of the
# row, one reduction for the KL and class terms. K = 512 (S = 64) in bf16 with the hard-label term on
# 2026-12-03 (1.58 -> 1.40x, 58.3 -> 51.7 SASS per element): a class's sums over its 16 lanes
# reduce-scattered (class_factors_scattered) instead of a 5-level butterfly for each of 8 sums. fp32
# S = 5 with the hard-label term (3.4 MUFU per element, 1.16-1.18x the floor) is within the MUFU
# budget counted per element of the bf16 floor's time, as the Triton gate of λ ≠ 1 counts it. S = 5
# and 10 in bf16 (1.8-2.5x on 2026-12-02) on 2026-12-03 (later session): 1.09-1.34x, 66-92 -> 40-50
# SASS per element, in chunks of 5 (warp::chunk_width) that hold whole classes, so that a class's sums
# stay in registers as at S = 8.
WEIGHTED_OVER_BUDGET = set()


@pytest.fixture(scope="module")
def modelled():
    return cuda_cost.model(cuda_cost.COST_PATHS + cuda_cost.WEIGHTED_COST_PATHS)


def _case_id(p):
    return p.name


@pytest.mark.parametrize("path", cuda_cost.COST_PATHS + cuda_cost.WEIGHTED_COST_PATHS, ids=_case_id)
def test_cuda_loss_modelled_time_within_budget(modelled, path, request):
    if path.weighted and (path.num_classes, path.n_subclasses, path.dtype, path.labels) in WEIGHTED_OVER_BUDGET:
        request.applymarker(pytest.mark.xfail(strict=True, reason="modelled over the budget"))
    e = modelled[path]
    # The MUFU budget is a share of the floor's time: an fp32 element's 12 B take twice a bf16 one's 6 B
    # (the Triton kernel's λ ≠ 1 gate, test_weighted_loss_modelled_time_within_budget, counts it so)
    floor = cuda_cost.FLOOR_BYTES[path.dtype] if path.weighted else 6
    assert e["mufu"] <= cost.MAX_MUFU_PER_ELEMENT * floor / 6, e
    assert max(e["H100"], e["H200"]) <= cost.MAX_LOSS_OVER_FLOOR, e


# SASS per element of every path, modelled 2026-12-02 (later session, nvcc 13.0, sm_90; S = 5 and 10
# at λ ≠ 1 in chunks of 5, and those that fell by 0.1-1.1 %, on 2026-12-03): a change that
# adds more than 3 % to a path fails test_cuda_loss_does_not_regress, even where the path stays at
# the floor (the ratios above are clamped at 1.00, so they miss it; e.g. the row max as fmaxf took
# K = 512 at lambda = 1 from 29 to 33). Update a figure when it falls.
RECORDED_SASS_PER_ELEMENT = {"K16_C2_bf16_plain": 25.81, "K16_C2_bf16_alpha": 36.38, "K16_C2_fp32_plain": 22.12,
                             "K16_C2_fp32_alpha": 32.88, "K40_C5_bf16_plain": 38.00, "K40_C5_bf16_alpha": 46.70,
                             "K40_C5_fp32_plain": 33.90, "K40_C5_fp32_alpha": 42.60, "K128_C16_bf16_plain": 33.69,
                             "K128_C16_bf16_alpha": 41.00, "K128_C16_fp32_plain": 30.50, "K128_C16_fp32_alpha": 37.25,
                             "K512_C16_bf16_plain": 29.38, "K512_C16_bf16_alpha": 42.38, "K512_C16_fp32_plain": 25.38,
                             "K512_C16_fp32_alpha": 38.62, "K40_C8_bf16_alpha": 38.35, "K40_C8_fp32_alpha": 35.05,
                             "K16_C2_bf16_plain_lambda": 38.19, "K16_C2_bf16_alpha_lambda": 45.12,
                             "K16_C2_fp32_plain_lambda": 34.69, "K16_C2_fp32_alpha_lambda": 41.62,
                             "K40_C8_bf16_plain_lambda": 40.35, "K40_C8_bf16_alpha_lambda": 47.90,
                             "K40_C8_fp32_plain_lambda": 37.15, "K40_C8_fp32_alpha_lambda": 44.65,
                             "K128_C8_bf16_plain_lambda": 45.75, "K128_C8_bf16_alpha_lambda": 54.81,
                             "K128_C8_fp32_plain_lambda": 42.25, "K128_C8_fp32_alpha_lambda": 50.88,
                             "K512_C8_bf16_plain_lambda": 41.19, "K512_C8_bf16_alpha_lambda": 51.12,
                             "K512_C8_fp32_plain_lambda": 37.56, "K512_C8_fp32_alpha_lambda": 46.75,
                             "K128_C16_bf16_plain_lambda": 45.75, "K128_C16_bf16_alpha_lambda": 54.81,
                             "K128_C16_fp32_plain_lambda": 42.25, "K128_C16_fp32_alpha_lambda": 50.88,
                             "K120_C12_bf16_plain_lambda": 40.87, "K120_C12_bf16_alpha_lambda": 49.67,
                             "K120_C12_fp32_plain_lambda": 37.73, "K120_C12_fp32_alpha_lambda": 46.40,
                             "K80_C16_bf16_plain_lambda": 41.75, "K80_C16_bf16_alpha_lambda": 49.40,
                             "K80_C16_fp32_plain_lambda": 38.45, "K80_C16_fp32_alpha_lambda": 46.15}


@pytest.mark.parametrize("path", cuda_cost.COST_PATHS + cuda_cost.WEIGHTED_COST_PATHS, ids=_case_id)
def test_cuda_loss_does_not_regress(modelled, path):
    assert modelled[path]["instructions"] <= 1.03 * RECORDED_SASS_PER_ELEMENT[path.name], modelled[path]


def test_cuda_loss_takes_16_values_per_lane():
    """K >= 16 puts 12-16 values in each lane, so that a row's reductions and per-row work are shared
    by that many elements (4 per lane before: K = 128 on 32 lanes took 110 instructions per bf16
    element, 2.98x the H200's floor)."""
    shapes = cuda_cost.shapes_of([16, 40, 128, 512])
    assert shapes == {16: (1, 4), 40: (4, 3), 128: (8, 4), 512: (32, 4)}


def test_class_wise_rows_of_5_subclasses_take_chunks_of_5():
    """λ ≠ 1 or the hard-label term at S = 5 2^j: chunks of 5, each part of one class (chunks of 4
    split classes of 5 and 10 at their boundaries, and a class of 20 is 5 of them, so their sums went
    through shared memory: 66-92 SASS per element at S = 5 and 10 in bf16); the plain KL keeps 16-byte
    chunks, and so do rows of more than 32 chunks of 5 (the layouts compiled)."""
    Path = cuda_cost.Path
    layouts = cuda_cost.layouts_of([Path(8, 5, "bf16", False, True), Path(8, 5, "bf16", True, False),
                                    Path(12, 10, "bf16", False, True), Path(8, 5, "bf16", False, False),
                                    Path(33, 5, "bf16", False, True), Path(4, 20, "bf16", True, True)])
    assert list(layouts.values()) == [(2, 4, 5), (2, 4, 5), (8, 3, 5), (4, 3, 4), (16, 3, 4), (4, 4, 5)]


def test_row_loop_counts_nested_loops_by_their_trips():
    """λ ≠ 1: a lane's class loop runs ceil(C / W) times per row, each class's element loops S times."""
    code = [(0x10, "FADD R1, R1, R2"), (0x20, "MUFU.LG2 R5, R5"), (0x30, "MUFU.EX2 R3, R3"), (0x40, "@P0 BRA 0x30"),
            (0x50, "@P2 BRA 0x20"), (0x60, "ISETP.NE.AND P1, PT, R4, RZ, PT"), (0x70, "@P1 BRA 0x10"), (0x80, "EXIT")]
    facts = cuda_cost.row_loop_facts(code, trips=(3, 5))
    assert facts == {"instructions": 3 + 2 * 3 + 2 * 15, "mufu": 3 + 15, "inner_loops": 2}
    with pytest.raises(ValueError):
        cuda_cost.row_loop_facts(code, trips=(3,))
