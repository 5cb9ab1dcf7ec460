"""The CUDA targets tile's modelled time (tests/cuda_targets_cost.py), held to issue 21's targets
budget: at most 1.25x the floor on the H100 and H200 at the cost shapes (4 M x 768 rows, K = 16 and
128, bf16 and fp32, with the head and with given logits, fp32 out), the paths still over it strict
xfails, and to its figures of 2026-12-06 (session 60; no regression). Runs wherever nvcc is (no GPU needed).
Before the resident form (the streaming tile of ee47aba, every shape's) the map's re-reads alone
put K = 16 at 1.96-1.98x the floor and K = 128 at 4.38-4.86x (bytes by arithmetic)."""

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_targets_cost as model  # noqa: E402

from lelp_fast.kernels.triton import cost  # noqa: E402

pytestmark = pytest.mark.skipif(model.NVCC is None or shutil.which("g++") is None, reason="nvcc or g++ not installed")

# Over the budget (modelled 2026-12-06, nvcc 13.0, sm_90, the production kernels, both sides of
# every branch counted): K = 128 streams a 442 KB map from L2 once per 128-row tile, 1.9-2.1x the
# H200's floor at the L2's read rate in bf16 (1.33-1.46x the H100's) and 1.5-1.6x in fp32, whose
# floor reads 4-byte h (within the budget on the H100: 1.02-1.09x); the streaming kernel's SASS is
# under that since session 60 (it put bf16 at 2.5-2.6x and fp32 at 1.9x by issue before). Until 2026-12-05
# it streamed 64-row tiles, its count held all 8 fragments a warp may take, and its bf16 fragments
# loaded through generic addresses: 8.7-9.4x (bf16), 5.5-5.9x (fp32). K = 16 is resident and within
# the budget (1.00), fp32 since its map is bf16 hi + lo and its embeddings are split into bf16 in
# shared memory (as TF32 hi + lo it streamed with the head, 7.41 / 10.61x, and was issue-bound with
# given logits, 1.36 / 1.94x).
OVER_BUDGET = {("bf16", 16, 8, True), ("bf16", 16, 8, False), ("fp32", 16, 8, True), ("fp32", 16, 8, False)}

# The modelled (H100, H200) time over the floor at 2026-12-06 (session 60): a change that makes a path
# slower by more than 3 % fails test_cuda_targets_cost_does_not_regress (update the figures when it
# is faster). The rows below fail the earlier sets:
# * session 60's third (a run-time guard a fragment in the k slice, every tile 5 fragments a warp):
#   K = 128 bf16 (1.525, 2.185), (1.494, 2.140), fp32 (1.125, 1.612), (1.101, 1.577);
# * session 60's second (the 128-row tile's map stage at the map's own leading dimension, ld_w): K = 128
#   bf16 (1.621, 2.323), (1.589, 2.277), fp32 (1.177, 1.687), (1.152, 1.651);
# * session 60's first (the embeddings' chunks staged in a loop, a division and a row check each):
#   K = 128 bf16 (1.717, 2.460), (1.683, 2.412), fp32 (1.297, 1.859), (1.270, 1.820);
# * session 54's (the log-softmaxes' expf and logf): K = 128 bf16 (1.788, 2.562) with the head, (1.753,
#   2.512) with given logits, fp32 (1.338, 1.917), (1.310, 1.877); K = 16 at 1.000;
# * session 53's (128-row tiles; the map's copies divided a step, B fragments' lane addresses made a
#   load, each element's store checked its row): K = 128 bf16 (2.331, 3.340) with the head, (2.209,
#   3.166) with given logits, fp32 (1.653, 2.369), (1.574, 2.255); K = 16 at 1.000;
# * 2026-12-02's (64-row streaming tiles, bf16 fragments loaded through generic addresses, the map
#   counted at the HBM's bandwidth): K = 16 bf16 (1.002, 1.002) with the head, (1.001, 1.040) with
#   given logits, fp32 (1.001, 1.154), (1.000, 1.050); K = 128 bf16 (6.530, 9.356), (6.062, 8.686),
#   fp32 (4.096, 5.869), (3.831, 5.489).
RECORDED = {("bf16", 4, 4, True): (1.000, 1.000), ("bf16", 4, 4, False): (1.000, 1.000),
            ("fp32", 4, 4, True): (1.000, 1.000), ("fp32", 4, 4, False): (1.000, 1.000),
            ("bf16", 16, 8, True): (1.458, 2.089), ("bf16", 16, 8, False): (1.334, 1.912),
            ("fp32", 16, 8, True): (1.090, 1.561), ("fp32", 16, 8, False): (1.018, 1.459)}


@pytest.fixture(scope="module")
def modelled():
    return model.model()


def _case_id(p):
    return f"{p.dtype}_K{p.k}_{'head' if p.head else 'logits'}"


@pytest.mark.parametrize("path", model.COST_PATHS, ids=_case_id)
def test_cuda_targets_modelled_time_within_budget(modelled, path, request):
    if tuple(path) in OVER_BUDGET:
        request.applymarker(pytest.mark.xfail(strict=True, reason="modelled over the budget"))
    e = modelled[path]
    assert max(e["H100"]["over_floor"], e["H200"]["over_floor"]) <= cost.TARGETS_MAX_OVER_FLOOR, e


@pytest.mark.parametrize("path", model.COST_PATHS, ids=_case_id)
def test_cuda_targets_cost_does_not_regress(modelled, path):
    e = modelled[path]
    h100, h200 = RECORDED[tuple(path)]
    assert e["H100"]["over_floor"] <= 1.03 * h100 and e["H200"]["over_floor"] <= 1.03 * h200, e


def test_log_softmax_exponentials_are_a_multiply_and_one_mufu_op(modelled):
    """The epilogue's exp-sum loops (lelp/row_math.h's softmax_exp): ex2.approx.ftz of a pre-scaled
    argument, as the Triton kernel's, in 11-12 instructions a trip with the loop's own; expf's range
    reduction took 16-17 (session 54's kernels), at 16 trips a class row and 8 a subclass row."""
    for path, e in modelled.items():
        sums = {where: ops for where, ops in e["loop_opcodes"].items() if "acc += " in where}
        assert len(sums) == 2, (path, list(e["loop_opcodes"]))
        for where, ops in sums.items():
            assert ops["MUFU.EX2"] == 1 and sum(ops.values()) <= 12, (path, where, dict(ops))


def test_streaming_step_stages_its_embeddings_without_a_loop(modelled):
    """A thread's embedding chunks of a step (2 in bf16, 4 in fp32, at 128 rows) lie 64 or 32 rows apart
    in one column: one source and destination a step, the others at constant offsets, and the zeros
    past the rows or columns one 16-byte store. They were a loop of a division, a row check and a
    64-bit product a chunk, and zeros element by element: 1,730 (bf16) and 3,786 (fp32) SASS a row more
    at K = 128 (session 60)."""
    for path, e in modelled.items():
        if e["form"] == "streaming":
            staged = [w for w in e["inner_loops"] if "kTileRows * kStep / V" in w or "e < V" in w]
            assert staged == [], (path, staged)


def test_resident_form_reads_the_map_once_per_block(modelled):
    """At K = 16 (bf16 and fp32) the launcher takes the resident form on sm_90: the map's copy loop
    lies outside the row-tile loop in the SASS (so it runs once per block), the 16-byte copies in the
    tile loop move h's bytes and no more, and the map's bytes per row are its 98 KB (with the head)
    over the 31,775 rows each of the 132 blocks takes. In the streaming form the SASS's copies per
    row agree with the model's bytes of h and the map: a thread's copies of h, and lane 0's of the
    map (a lane a 16-byte chunk of a map row, so lane 0 copies a chunk of every row its warp takes,
    the map's bytes times 32 over the chunks a row), over one step more than the 24 a row takes (the
    step loop's body, counted at its 24 trips, stages the next step, and the first is staged before
    it: the model counts one step's copies over)."""
    for path in model.COST_PATHS:
        e = modelled[path]
        if path.k == 16:
            assert e["form"] == "resident"
            assert any("m.k < rows" in loop for loop in e["outer_loops"]), e["outer_loops"]
            assert not any("m.k < rows" in loop for loop in e["inner_loops"]), e["inner_loops"]
            assert e["copied_per_row"] == e["h"] == 768 * (2 if path.dtype == "bf16" else 4)
            assert e["map"] < 4
        if e["form"] == "streaming":
            chunks = -(-path.j // 16) * 16 // 8
            steps = 768 // 32
            assert e["copied_per_row"] == (e["h"] + e["map"] * 32 / chunks) * (steps + 1) / steps, e


def test_streaming_tile_reads_the_map_once_per_128_rows(modelled):
    """Issue 21 item 10 (CUDA, K = 128): the streaming tile read the 442 KB split map (768 x 144
    columns, hi + lo) once per 64 rows, 6,912 B a row with the head in bf16. With two row fragments a
    warp (16-byte rows, maps of up to 160 columns, two blocks an SM in sm_90's shared memory) a tile is
    128 rows, bf16 and fp32: 3,456 B a row (3,072 with given logits, 128 columns). The SASS's copies
    agree (the test above)."""
    for path in model.COST_PATHS:
        e = modelled[path]
        if path.k == 128:
            rows = 128
            assert e["form"] == "streaming" and e["tile_rows"] == rows, e
            assert e["map"] == 2 * 768 * path.j * 2 / rows, e


def _streaming_loop(e, statement):
    (opcodes,) = [ops for where, ops in e["loop_opcodes"].items() if where.startswith(statement)]
    return opcodes


def test_streaming_step_divides_nothing(modelled):
    """Issue 21 item 10 (CUDA, K = 128): the step loop of the streaming tile copied its map rows by a
    walk over (row, chunk) pairs that started with two 32-bit divisions by the chunks a row, every
    step (I2F.RP, MUFU.RCP and some 20 instructions in the SASS); a warp now takes whole rows, a lane
    a row's chunk (stage_map_step), so the loop has no integer division."""
    for path in model.COST_PATHS:
        e = modelled[path]
        if e["form"] == "streaming":
            opcodes = _streaming_loop(e, "for (int s = 0; s < steps; ++s)")
            assert not [op for op in opcodes if op.startswith(("I2F.RP", "MUFU.RCP"))], opcodes


def test_streaming_k_slice_loads_b_fragments_at_constant_offsets(modelled):
    """Issue 21 item 10 (CUDA, K = 128): each B fragment's ldmatrix took its lane's address from
    %laneid and the leading dimension again (ptxas's expansion of wmma.load.b, rematerialised at 128
    registers): 10.2 (bf16) and 10.8 (fp32) instructions besides the HMMAs and LDSMs per B fragment in
    the k-slice loop. The lane's address is now made once a step (Mma::b_at) and each fragment loads
    at an offset from it: 5.1 and 5.3. Since session 60 the 128-row tile's map stage has a constant
    leading dimension (tile::kPairedLdW), so the offsets are immediates (4.4 and 4.6), and a warp
    computes all the fragments of its instantiation (tile::paired_frags) without a run-time guard
    each, whose warp-synchronous branches were most of what was left: 9 (bf16) and 11 (fp32)
    instructions a k slice now, for its 8 or 10 B fragments."""
    for path in model.COST_PATHS:
        e = modelled[path]
        if e["form"] == "streaming":
            opcodes = _streaming_loop(e, "for (int kk = 0; kk < kStep; kk += Mma::kK)")
            b_loads = opcodes["LDSM.16.MT88.4"]
            other = sum(n for op, n in opcodes.items() if not op.startswith(("HMMA", "LDSM")))
            assert b_loads == 2 * ((path.j + 31) // 32) and other <= 12 and opcodes["WARPSYNC.ALL"] == 0, opcodes


def test_a_loop_without_a_trip_count_fails_the_model():
    """A loop the model has no trip count for is an error, not a loop counted once."""
    with pytest.raises(ValueError, match="no trip count"):
        model.trips_of("  for (int q = 0; q < a.n; ++q) {", model.COST_PATHS[0], True)
    assert model.trips_of("for (int64_t s = 0; s < steps; ++s) {", model.COST_PATHS[0], True) == 12
    assert model.trips_of("for (int64_t s = 0; s < steps; ++s) {", model.COST_PATHS[0], False) == 24
