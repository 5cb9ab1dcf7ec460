"""Triton kernels against the fp64 reference; on CPU under TRITON_INTERPRET=1 (small sizes)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

triton = pytest.importorskip("triton")

from lelp_fast.kernels.triton.interpreter_fix import patch_interpreter  # noqa: E402

if not torch.cuda.is_available():
    patch_interpreter()

import triton.language as tl  # noqa: E402

from lelp_fast import reference  # noqa: E402
from lelp_fast.ops import distill_loss, lelp_targets  # noqa: E402
from test_ops_targets import fp64_reference, random_map  # noqa: E402
from test_ops_loss import TOL, make_inputs, reference_loss_and_grad  # noqa: E402
import test_ops_loss  # noqa: E402
import test_ops_targets  # noqa: E402
import test_subclass_variants  # noqa: E402
from lelp_fast.kernels.triton import limits  # noqa: E402
from lelp_fast.ops import _dispatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter evaluates masked-out lanes too (log of 0 in padding columns): numpy warns, results are unaffected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5, 2, 1), (19, 37, 3, 5), (33, 70, 2, 8)])
@pytest.mark.parametrize("with_head", [True, False])
def test_triton_targets_match_reference(dtype, shape, with_head):
    n, d, num_classes, s = shape
    h, weight, bias, logits = random_map(n, d, num_classes, s, with_head, seed=n + d)
    h_in = h.to(dtype)
    z_in = None if logits is None else logits.to(dtype)
    want = fp64_reference(h_in, weight, bias, z_in, num_classes, s, beta=0.8, tau=1.3)
    out = torch.full((n, num_classes * s), float("nan"), device=DEVICE)  # poisoned
    got = lelp_targets(h_in.to(DEVICE), weight.float().to(DEVICE), bias.float().to(DEVICE), num_classes, s,
                       teacher_logits=None if z_in is None else z_in.to(DEVICE), beta=0.8, tau=1.3,
                       backend="triton", out=out)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, with_head", [((9, 20, 10, 16), True), ((70, 20, 16, 16), False),
                                              ((5, 20, 150, 2), False), ((4, 24, 3, 100), True)])
def test_triton_targets_over_several_class_groups(dtype, shape, with_head):
    """Grids wider than one program's columns (64, or 128 for a class of more than 64 subclasses): 3 to
    5 class groups per row tile, only those that hold a class; 150 given logits, whose log-partition
    is taken 32 at a time; S = 100 padded to 128. Before, one program held up to 512 columns and could
    not launch on a GPU (shared memory). (300 given logits of one subclass, here until 2026-12-04, are
    vanilla KD: ``kd_targets``.)"""
    test_triton_targets_match_reference(dtype, shape, with_head)


def test_targets_programs_hold_64_columns_but_for_whole_grids_and_wide_classes():
    """Programs of 128 columns only for a whole 16-bit grid with the head ("mid-exact-head", the fastest
    measured), a whole 16-bit grid of 128 columns with given logits ("mid-exact-logits", since 2026-12-05: one
    program reads h once where two of 64 read it twice) and a class of 65-128 (padded) subclasses;
    every other grid in programs of at most 64 ("narrow": faster on the H200 and without the spills of
    "mid" on padded grids)."""
    from lelp_fast.kernels.triton import targets as tt

    def program(c, s, with_head):
        p = tt.plan(768, c, s, torch.bfloat16, with_head)
        return p.constexprs["C_BLOCK"] * p.constexprs["S_PAD"], p.tuner[0], p.groups

    assert program(8, 16, True) == (128, "mid-exact-head", 1)
    assert program(15, 7, True) == (64, "narrow", 2)  # padded 16 x 8
    assert program(8, 16, False) == (128, "mid-exact-logits", 1)  # given logits (two of 64 until 2026-12-05)
    assert tt.plan(768, 8, 16, torch.float32, False).groups == 2  # fp32 keeps two (FP32_CONFIGS)
    # fp32 and unaligned d take no whole grid, with the head either (since session 54: their
    # 128-column config measured slower on the H200 than two programs of 64, FP32_CONFIGS)
    for dtype, d in ((torch.float32, 768), (torch.bfloat16, 50), (torch.float32, 300)):
        for c, s, groups in ((16, 8, 2), (8, 16, 2), (2, 64, 2), (16, 16, 4)):
            p = tt.plan(d, c, s, dtype, True)
            assert (p.groups, p.tuner[0], p.config.block_d) == (groups, "narrow", 32), (dtype, d, c, s, p)
    assert program(64, 2, False) == (128, "mid-exact-logits", 1)
    assert program(8, 32, False) == (64, "narrow", 4)  # given logits, 256 columns
    assert program(15, 8, False) == (64, "narrow", 2)  # given logits, padded 16 x 8
    assert program(150, 2, False) == (64, "narrow", 5)  # of 8 class groups, the 5 that hold a class
    assert program(2, 50, True) == (64, "narrow", 2)  # two classes padded to 64 subclasses
    assert program(3, 100, True) == (128, "mid", 3)  # a class padded to 128 subclasses; C_PAD = 4
    assert program(4, 4, True) == (16, "thin", 1)


@pytest.mark.parametrize("beta", [1e50, float("inf")])
def test_triton_targets_of_a_padded_grid_at_a_huge_beta(beta):
    """A β whose 1/β is 0 in fp32 (the public API takes any finite β > 0; an online teacher's β is
    checked only to be > 0): each class's subclasses equally likely, the reference's limit, not NaN
    (a padded slot's -inf bias times a zero 1/β was NaN; found in review, 2026-12-04)."""
    from lelp_fast.kernels.triton import targets as tt

    c, s = 3, 5  # padded to 4 x 8
    h, weight, bias, _ = random_map(33, 16, c, s, True, seed=5)
    want = fp64_reference(h.float(), weight, bias, None, c, s, beta=beta, tau=1.3)
    out = torch.full((33, c * s), float("nan"), device=DEVICE)  # poisoned
    got = tt.targets_triton(h.float().to(DEVICE), weight.float().to(DEVICE), bias.float().to(DEVICE), c, s, None,
                            beta, 1.3, out)
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-4, rtol=1e-4)


def test_split_map_pads_subclass_slots_with_minus_inf():
    """The kernel takes each class's log-partition over all S_PAD slots without a mask (a mask spilled
    on padded grids), so a padded slot's bias is -inf and its u too; the real slots keep the map's
    bias, padded classes' real slots 0."""
    from lelp_fast.kernels.triton import targets as tt

    c, s, d = 3, 5, 16
    weight, bias = torch.randn(d, c * s + c), torch.randn(c * s + c)
    split = tt.split_map(weight, bias, c, s, torch.bfloat16, with_head=True)
    grid = split.sub_bias.view(split.c_pad, split.s_pad)
    assert (split.c_pad, split.s_pad) == (4, 8)
    assert torch.equal(grid[:c, :s], bias[:c * s].view(c, s))
    assert torch.equal(grid[c:, :s], torch.zeros(split.c_pad - c, s))
    assert (grid[:, s:] == float("-inf")).all()


def test_the_targets_autotuner_never_times_a_launch():
    """Issue 21 item 5 (autotune warmed outside graph capture): each targets config list has one
    entry, so Triton's autotuner launches it without timing (``Autotuner.run`` benchmarks only when
    it holds more than one config, under 3.6 and 3.9 alike), and a first launch inside a CUDA-graph
    capture records the kernel, not a benchmark's launches and synchronisations. A second config
    would need its autotune warmed before any capture."""
    from lelp_fast.kernels.triton import targets as triton_targets

    assert all(len(tuner.configs) == 1 for tuner in triton_targets._autotuned.values())


def test_triton_targets_refuse_classes_wider_than_a_program():
    """S > 128 would need a wider accumulator than a program holds without spills: forced triton
    says so, auto takes the next backend."""
    assert limits.targets_unsupported(2, 256, with_head=True) and not limits.targets_unsupported(4, 128, True)
    h, weight, bias, _ = random_map(3, 8, 2, 200, True, seed=1)
    with pytest.raises(ValueError, match="whole classes of at most 128"):
        lelp_targets(h.float().to(DEVICE), weight.float().to(DEVICE), bias.float().to(DEVICE), 2, 200,
                     backend="triton")


@pytest.fixture
def one_program_per_group(monkeypatch):
    """The persistent kernels with one program per class group, so each loops over every row tile
    (the interpreter's grid; a GPU's is 2 per SM). The kernels had no row-tile loop before."""
    from lelp_fast.kernels.triton import targets as triton_targets

    monkeypatch.setattr(triton_targets, "INTERPRETER_PROGRAMS", 1)
    return triton_targets


# (n, d, C, S, with_head): d = 37 is no whole number of BLOCK_D slices.
PERSISTENT_SHAPES = [(1, 64, 3, 5, True), (261, 128, 2, 8, False), (261, 37, 3, 5, True), (130, 64, 4, 16, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 24, 100, 2), (9, 40, 40, 2)])
def test_triton_targets_take_many_given_logits_in_chunks(dtype, shape):
    """Given logits of more than 32 classes: their log-partition is taken 32 classes at a time with
    online rescaling (``targets._logits_lse``; chunks of 128 spilled up to 2.5 KB per thread), over
    4 chunks and a masked last one at C = 100, 2 at C = 40."""
    test_triton_targets_match_reference(dtype, shape, with_head=False)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's cast")
def test_interpreter_rounds_fp32_to_bf16_as_a_gpu_does():
    """Triton's interpreter truncated fp32 -> bf16 where a GPU rounds to nearest even, so the fp32
    targets' bf16 split (``targets._split_h``) erred 4x more on the CPU than on a GPU. Patched
    (``interpreter_fix``): bit for bit as torch rounds, ties to even, overflow to inf, NaN kept."""
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.bfloat16), mask=offs < n)

    g = torch.Generator().manual_seed(0)
    edges = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.39e38, 3.4e38, float("inf"), -float("inf"), 1e-40, 0.0, -0.0]
    x = torch.cat([torch.randn(1000, generator=g) * 1e3, torch.tensor(edges), torch.tensor([float("nan")])])
    y = torch.empty(len(x), dtype=torch.bfloat16)
    cast[(1,)](x, y, len(x), BLOCK=2048)
    want = x.to(torch.bfloat16)
    assert torch.equal(y[:-1].view(torch.int16), want[:-1].view(torch.int16)) and y[-1].isnan()


@pytest.mark.skipif(DEVICE != "cpu", reason="forces the interpreter's grid")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", PERSISTENT_SHAPES)
def test_triton_targets_persistent_loop_matches_reference(one_program_per_group, dtype, shape):
    n, d, num_classes, s, with_head = shape
    test_triton_targets_match_reference(dtype, (n, d, num_classes, s), with_head)


@pytest.mark.skipif(DEVICE != "cpu", reason="forces the interpreter's grid")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(261, 48, 16, 8), (130, 64, 8, 16), (70, 32, 64, 2), (40, 32, 1, 128),
                                   (33, 37, 4, 32)])
def test_triton_targets_whole_128_column_grid_with_given_logits(one_program_per_group, dtype, shape):
    """A whole grid of 128 columns with given logits and 16-bit embeddings of a 16-aligned width is one
    program a row tile ("mid-exact-logits", since 2026-12-05; two of 64 columns before, each reading
    h); fp32 and an unaligned width (d = 37) keep two (1 x 128: one of "mid"): the targets match the
    reference over several row tiles, 64 given logits taken 32 at a time."""
    from lelp_fast.kernels.triton import targets as tt

    n, d, num_classes, s = shape
    p = tt.plan(d, num_classes, s, dtype, with_head=False)
    whole = dtype != torch.float32 and d % 16 == 0
    want = ("mid-exact-logits", 1, 128) if whole else ("mid", 1, 128) if s > 64 else ("narrow", 2, 64)
    assert (p.tuner[0], p.groups, p.constexprs["C_BLOCK"] * p.constexprs["S_PAD"]) == want
    test_triton_targets_match_reference(dtype, (n, d, num_classes, s), False)


@pytest.mark.skipif(DEVICE != "cpu", reason="forces the interpreter's grid")
@pytest.mark.parametrize("dtype, d", [(torch.float32, 48), (torch.float32, 37), (torch.bfloat16, 37),
                                      (torch.float16, 50)])
@pytest.mark.parametrize("shape", [(261, 16, 8), (130, 8, 16), (33, 2, 64), (9, 16, 16)])
def test_triton_targets_whole_grid_with_the_head_in_fp32_or_unaligned_takes_programs_of_64(
        one_program_per_group, dtype, d, shape):
    """A whole grid with the teacher's head in fp32, or of an unaligned width, takes programs of 64
    columns, each reading h and the head's columns (since session 54; before, one program of 128 at
    128 x 16 x 8 x 2, a config each H200 measurement found slower than two programs of 64:
    targets.FP32_CONFIGS): the targets match the reference over several row tiles."""
    from lelp_fast.kernels.triton import targets as tt

    n, num_classes, s = shape
    p = tt.plan(d, num_classes, s, dtype, with_head=True)
    assert (p.tuner[0], p.groups, p.constexprs["C_BLOCK"] * p.constexprs["S_PAD"]) == ("narrow", num_classes * s // 64, 64)
    test_triton_targets_match_reference(dtype, (n, d, num_classes, s), True)


@pytest.mark.skipif(DEVICE != "cpu", reason="forces the interpreter's grid")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_targets_persistent_loop_huge_logits_tiny_beta_and_nan_rows(one_program_per_group, dtype):
    """Huge projections (|log t| ~ 1e6) with beta = 0.01, and NaN rows in the last tile: each row's
    targets come from its own tile's accumulators (a NaN row gives NaN targets in that row only).
    The hi + lo map carries 16 bits of each column, and fp32 h is split into two bf16 parts: errors up
    to ~2^-16 of the largest |log t| (measured: fp32 5.2e-6 of it, bf16 2.8e-6)."""
    h, weight, bias, _ = test_ops_targets.random_map(300, 64, 2, 4, True, seed=3, scale=1e3)
    h = h.to(dtype)
    weight, bias = (weight * 10).float(), bias.float()
    got = lelp_targets(h, weight, bias, 2, 4, beta=0.01, backend="triton")
    want = fp64_reference(h, weight.double(), bias.double(), None, 2, 4, 0.01, 1.0)
    atol = 2.0**-16 * float(want.abs().max())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4)
    h[[0, 290]] = float("nan")
    got = lelp_targets(h, weight, bias, 2, 4, beta=0.01, backend="triton", check_inputs=False)
    assert got[[0, 290]].isnan().all()
    keep = [i for i in range(300) if i not in (0, 290)]
    torch.testing.assert_close(got[keep].double(), want[keep], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 1), (21, 3, 5), (6, 2, 40)])
def test_triton_loss_matches_reference(divergence, dtype, shape):
    n, num_classes, s = shape
    student, log_t, labels = make_inputs(n, num_classes, s, seed=n + s)
    if n > 1:
        labels[1] = -100
    x = student.to(dtype).to(DEVICE).requires_grad_(True)
    kw = dict(num_classes=num_classes, n_subclasses=s, tau=1.7, alpha=0.3)
    loss = distill_loss(x, log_t.to(dtype).to(DEVICE), labels.to(DEVICE), divergence=divergence, backend="triton", **kw)
    loss.backward()
    want, want_grad = reference_loss_and_grad(x.cpu(), log_t.to(dtype), labels, divergence_kind=divergence, **kw)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss.cpu().double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.cpu().double(), want_grad, atol=atol * 2, rtol=rtol * 10)


def test_triton_multi_teacher_and_huge_logits():
    student, log_t, labels = make_inputs(9, 2, 3, seed=3, m=2, scale=1e4)
    w = torch.tensor([[0.3, 0.7]] * 8 + [[1.0, 0.0]], dtype=torch.float32)
    x = student.float().to(DEVICE).requires_grad_(True)
    loss = distill_loss(x, log_t.float().to(DEVICE), labels.to(DEVICE), num_classes=2, n_subclasses=3,
                        teacher_weights=w.to(DEVICE), divergence="js", backend="triton")
    loss.backward()
    mixed = torch.log((w.double().unsqueeze(-1) * log_t.float().double().exp()).sum(1))
    want, want_grad = reference_loss_and_grad(x.cpu(), mixed, labels, num_classes=2, n_subclasses=3,
                                              divergence_kind="js")
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.cpu().double(), want, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(x.grad.cpu().double(), want_grad, atol=1e-3, rtol=1e-4)


@triton.jit
def _flushing_log2(x):
    """log2 that flushes inputs below FLT_MIN to 0, as the GPU's ``lg2.approx.ftz`` does."""
    return tl.log2(tl.where(x < 1.1754943508222875e-38, 0.0, x))


@pytest.mark.skipif(DEVICE != "cpu", reason="emulates the GPU's flushing log2 in the interpreter")
@pytest.mark.parametrize("divergence, subclass_weight", [("kl", 1.0), ("kl", 0.1), ("js", 1.0)])
def test_mixed_targets_below_flt_min_survive_a_flushing_log2(monkeypatch, divergence, subclass_weight):
    """On a GPU the kernel's log2 is one MUFU op (``lg2.approx.ftz``), which flushes inputs below
    FLT_MIN to 0: a mixed target, or JS's mixture m of a target and a student probability both
    that small, would get log t = -inf and t (log t - log q) = -inf. ``_log2_probability`` scales
    its inputs up first. Emulated here: the interpreter's log2 replaced by one that flushes as the
    GPU's does."""
    import lelp_fast.kernels.triton.loss as triton_loss

    monkeypatch.setattr(triton_loss, "_fast_log2", _flushing_log2)
    student, log_t, labels = make_inputs(7, 3, 4, seed=6, m=2)
    log_t[:, 1, :5] = -95.0  # e^-95 = 5.5e-42: subnormal in fp32
    log_t[:, 1] = torch.log_softmax(log_t[:, 1], -1)
    student[:, :5] -= 200.0  # q = e^-100 there at τ = 2: JS's m = (t + q) / 2 subnormal too
    w = torch.tensor([[0.0, 1.0]] * 4 + [[1e-3, 1 - 1e-3]] * 3)
    x = student.float().requires_grad_(True)
    kw = dict(num_classes=3, n_subclasses=4, divergence=divergence, teacher_weights=w, tau=2.0,
              subclass_weight=subclass_weight if divergence == "kl" else 1.0)
    loss = distill_loss(x, log_t.float(), labels, backend="triton", reduction="none", **kw)
    want = distill_loss(student, log_t, labels, backend="torch", reduction="none", **kw)  # fp64
    assert torch.isfinite(loss).all(), loss
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("divergence", ["kl", "js", "mse"])
@pytest.mark.parametrize("k_shape", [(3, 3), (11, 1), (3, 8), (5, 8), (6, 8), (2, 100), (4, 81), (3, 7), (5, 9)])
def test_triton_loss_column_pieces(divergence, k_shape):
    """Rows that are not a power of two wide are one piece of a power of two and a second of a quarter
    or a half of it (K = 9: 8 + 2, 11: 8 + 4, 24: 16 + 8, 40: 32 + 8, 48: 32 + 16, 324: 256 + 128 with
    60 columns masked; 200 is one piece of 256; odd K = 21 and 45 in the chunked layout of a
    half-width piece: 16 + 8 and 32 + 16, masked), with the hard-label term and an ignored row."""
    num_classes, s = k_shape
    student, log_t, labels = make_inputs(19, num_classes, s, seed=num_classes * s)
    labels[2] = -100
    x = student.float().to(DEVICE).requires_grad_(True)
    kw = dict(num_classes=num_classes, n_subclasses=s, tau=1.3, alpha=0.4)
    loss = distill_loss(x, log_t.float().to(DEVICE), labels.to(DEVICE), divergence=divergence, backend="triton", **kw)
    loss.backward()
    want, want_grad = reference_loss_and_grad(x.cpu(), log_t, labels, divergence_kind=divergence, **kw)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(loss.cpu().double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.cpu().double(), want_grad, atol=atol * 2, rtol=rtol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_folded_gradient_follows_the_incoming_gradient(dtype, reduction):
    """The kernel writes the gradient with τ and the reduction's scale folded in (bf16/fp32; fp16 keeps
    the fp32 gradient scaled in the backward); the backward hands it on when the incoming gradient is
    1 and scales it otherwise (here 3, as an AMP loss scale would), ignored rows left out of the mean."""
    student, log_t, labels = make_inputs(23, 5, 8, seed=5)
    labels[[1, 7]] = -100
    kw = dict(num_classes=5, n_subclasses=8, tau=2.0, alpha=0.2, reduction=reduction)
    want, want_grad = reference_loss_and_grad(student.to(dtype), log_t.to(dtype), labels, **kw)
    atol, rtol = TOL[dtype]
    for upstream in (1.0, 3.0):
        x = student.to(dtype).to(DEVICE).requires_grad_(True)
        loss = distill_loss(x, log_t.to(dtype).to(DEVICE), labels.to(DEVICE), backend="triton", **kw)
        (loss * upstream).backward()
        assert x.grad.dtype == dtype
        torch.testing.assert_close(loss.detach().cpu().double(), want, atol=atol, rtol=rtol)
        torch.testing.assert_close(x.grad.cpu().double(), upstream * want_grad, atol=atol * 2 * upstream,
                                   rtol=rtol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(test_ops_loss.FORWARD_ONLY_CASES))
def test_triton_loss_without_a_gradient_wanted_runs_forward_only(monkeypatch, dtype, case):
    """Under ``torch.no_grad()`` or for logits that need no gradient, the kernel is launched without
    one (``WITH_GRAD`` off: its arithmetic and N x K stores compiled out); the loss is the training call's."""
    import lelp_fast.kernels.triton.loss as triton_loss

    given, launch = [], triton_loss.loss_triton

    def recording(student, log_targets, weights, labels, num_classes, n_subclasses, divergence, jsd_beta, tau,
                  alpha, ignore_index, loss_rows, hard_rows, grad, *args, **kwargs):
        given.append(grad)  # the gradient buffer, or None
        return launch(student, log_targets, weights, labels, num_classes, n_subclasses, divergence, jsd_beta, tau,
                      alpha, ignore_index, loss_rows, hard_rows, grad, *args, **kwargs)

    monkeypatch.setattr(triton_loss, "loss_triton", recording)
    call = test_ops_loss._forward_only_call
    want, _ = call(case, dtype, "triton", device=DEVICE)
    with_grad = len(given)
    with torch.no_grad():
        got, _ = call(case, dtype, "triton", device=DEVICE)
    frozen, _ = call(case, dtype, "triton", requires_grad=False, device=DEVICE)
    assert with_grad >= 1 and all(g is not None for g in given[:with_grad])
    assert given[with_grad:] == [None] * 2 * with_grad
    # the same arithmetic; compiled without the gradient, a GPU may contract other products into FMAs
    tol = dict(atol=0, rtol=0) if DEVICE == "cpu" else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, want.detach(), **tol)
    torch.testing.assert_close(frozen, want.detach(), **tol)


NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _record_loss_launches(monkeypatch) -> list:
    """The (student, targets, gradient) dtype names of each Triton loss launch from now on, filled as
    they run (gradient None: the forward-only kernel)."""
    import lelp_fast.kernels.triton.loss as triton_loss

    launched, launch = [], triton_loss.loss_triton

    def recording(student, log_targets, *args, **kwargs):
        grad = args[11]
        launched.append((NAMES[student.dtype], NAMES[log_targets.dtype], None if grad is None else NAMES[grad.dtype]))
        return launch(student, log_targets, *args, **kwargs)

    monkeypatch.setattr(triton_loss, "loss_triton", recording)
    return launched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_online_launch_dtypes_are_compiled_ahead_of_time(monkeypatch, dtype):
    """The online loss launches the loss kernel on a 16-bit student against the fp32 buffer its
    teachers' targets go to: dtypes that tests/test_triton_aot.py compiles (``aot.MIXED_DTYPES``)."""
    from lelp_fast.kernels.triton import aot

    launched = _record_loss_launches(monkeypatch)
    x = torch.randn(9, 12, dtype=dtype, device=DEVICE).requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    emb, w, b = torch.randn(9, 6, generator=g), torch.randn(6, 15, generator=g), torch.randn(15, generator=g)
    distill_loss(x, None, num_classes=3, n_subclasses=4, embeddings=emb.to(DEVICE), fused_weight=w.to(DEVICE),
                 fused_bias=b.to(DEVICE), backend="triton").backward()
    for arch in aot.ARCHS:
        compiled = {*aot.MIXED_DTYPES[arch], *((s, t, s) for s, t in aot.LOSS_DTYPES[arch])}
        assert launched and all(dts in compiled for dts in launched), (arch, launched)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("target_dtype", list(NAMES), ids=list(NAMES.values()))
@pytest.mark.parametrize("dtype", list(NAMES), ids=list(NAMES.values()))
def test_loss_launch_dtype_widths_are_compiled_ahead_of_time(monkeypatch, dtype, target_dtype, reduction):
    """Each (student, targets, gradient) the loss launcher pairs has its widths (16 or 32 bits: what
    the kernel's loads, stores and registers follow) among those tests/test_triton_aot.py compiles
    for sm_80 and sm_90 (``aot.LOSS_DTYPES``; ``aot.MIXED_DTYPES`` for every variant that writes the
    gradient; forward-only launches: the next test). Until 2026-12-03 an fp16 student or
    reduction="none" against 16-bit targets (fp32 gradient) and an fp32 student against 16-bit
    targets were launched in widths never compiled."""
    from lelp_fast.kernels.triton import aot

    launched = _record_loss_launches(monkeypatch)
    student, log_t, labels = make_inputs(5, 3, 4, seed=4)
    x = student.to(dtype).to(DEVICE).requires_grad_(True)
    distill_loss(x, log_t.to(target_dtype).to(DEVICE), labels.to(DEVICE), num_classes=3, n_subclasses=4,
                 reduction=reduction, backend="triton").sum().backward()
    for arch in aot.ARCHS:
        compiled = aot.compiled_widths("loss", arch)
        assert launched and all(aot.widths(dts) in compiled for dts in launched), (arch, launched, compiled)


@pytest.mark.parametrize("target_dtype", list(NAMES), ids=list(NAMES.values()))
@pytest.mark.parametrize("dtype", list(NAMES), ids=list(NAMES.values()))
def test_forward_only_launch_dtype_widths_are_compiled_ahead_of_time(monkeypatch, dtype, target_dtype):
    """A call that wants no gradient launches the forward-only kernel (its gradient pointer dead
    code): its (student, targets) widths are among those tests/test_triton_aot.py compiles forward
    only (``aot.LOSS_DTYPES``, ``aot.FORWARD_DTYPES``). Until 2026-12-04, 16 against 32 bits and 32
    against 16 were launched and not compiled."""
    from lelp_fast.kernels.triton import aot

    launched = _record_loss_launches(monkeypatch)
    student, log_t, labels = make_inputs(5, 3, 4, seed=4)
    distill_loss(student.to(dtype).to(DEVICE), log_t.to(target_dtype).to(DEVICE), labels.to(DEVICE), num_classes=3,
                 n_subclasses=4, backend="triton")
    assert launched and all(grad is None for *_, grad in launched), launched
    for arch in aot.ARCHS:
        compiled = aot.compiled_widths("loss-forward", arch)
        assert all(aot.widths(dts[:2]) in compiled for dts in launched), (arch, launched, compiled)


@pytest.mark.parametrize("out_dtype", list(NAMES), ids=list(NAMES.values()))
@pytest.mark.parametrize("logits_dtype", [None, *NAMES], ids=["head", *NAMES.values()])
@pytest.mark.parametrize("dtype", list(NAMES), ids=list(NAMES.values()))
def test_targets_launch_dtype_widths_are_compiled_ahead_of_time(monkeypatch, dtype, logits_dtype, out_dtype):
    """Each (embeddings, teacher logits, output) the targets launcher pairs is among those
    tests/test_triton_aot.py compiles for sm_80 and sm_90 (each variant in its own dtype with an fp32
    output, and ``aot.TARGETS_DTYPES``): the embeddings' dtype, the logits' and output's widths. Until
    2026-12-03 only the variant's own were: 16-bit outputs and logits in another width than the
    embeddings were launched, never compiled; until session 58 fp16 embeddings were compiled in their
    own widths only (fp32 logits or a 16-bit output stood for by bf16's kernel)."""
    import lelp_fast.kernels.triton.targets as triton_targets
    from lelp_fast.kernels.triton import aot

    launched, launch = [], triton_targets.targets_triton

    def recording(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out):
        read = ([teacher_logits] if teacher_logits is not None else []) + [out]
        launched.append((NAMES[embeddings.dtype], *aot.widths([NAMES[t.dtype] for t in read])))
        return launch(embeddings, weight, bias, num_classes, n_subclasses, teacher_logits, beta, tau, out)

    monkeypatch.setattr(triton_targets, "targets_triton", recording)
    h, weight, bias, logits = random_map(6, 32, 2, 8, logits_dtype is None, seed=6)
    lelp_targets(h.to(dtype).to(DEVICE), weight.float().to(DEVICE), bias.float().to(DEVICE), 2, 8,
                 teacher_logits=None if logits is None else logits.to(logits_dtype).to(DEVICE), out_dtype=out_dtype,
                 backend="triton")
    for arch in aot.ARCHS:
        compiled = aot.compiled_widths("targets", arch)
        assert launched and all(w in compiled for w in launched), (arch, launched, compiled)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_triton_second_backward_is_refused_not_wrong(scale):
    """The folded gradient is handed on to autograd, not copied: a second backward through the same
    loss would hand on the same tensor again, so it raises, with lelp_fast's message. Where the first
    backward scaled it in place (a scale other than 1 here; on a GPU always, by the device-side
    scale), autograd's version check raised first with its own (the H200, 2026-12-04)."""
    student, log_t, labels = make_inputs(4, 2, 2, seed=11)
    x = student.float().to(DEVICE).requires_grad_(True)
    loss = distill_loss(x, log_t.float().to(DEVICE), labels.to(DEVICE), num_classes=2, n_subclasses=2,
                        backend="triton") * scale
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        loss.backward()


@pytest.mark.skipif(DEVICE != "cpu", reason="aot_eager on the interpreter")
def test_triton_folded_loss_traces_under_torch_compile():
    """fullgraph tracing of the folded path: the loss op's fake gives the gradient in the student's
    dtype, and the compiled backward scales it through the scale_unless_one custom op (here by 2)."""
    student, log_t, _ = make_inputs(16, 2, 4, seed=9)
    x = student.float().requires_grad_(True)

    def step(s, t):
        return distill_loss(s, t, num_classes=2, n_subclasses=4, tau=2.0, backend="triton", check_inputs=False)

    (2 * torch.compile(step, fullgraph=True, backend="aot_eager")(x, log_t.float())).backward()
    want, want_grad = reference_loss_and_grad(x, log_t, None, num_classes=2, n_subclasses=4, tau=2.0)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(x.grad.double(), 2 * want_grad, atol=atol * 2, rtol=rtol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scale_unless_one(dtype):
    """The backward's device-side scale (what a GPU runs in place of a host test of grad_output):
    nothing changes at 1, every element (past one program's block too) is scaled otherwise."""
    from lelp_fast.kernels.triton.loss import SCALE_BLOCK, scale_unless_one

    x = torch.randn(SCALE_BLOCK + 5, dtype=torch.float32).to(dtype).to(DEVICE)
    want = x.clone()
    scale_unless_one(x, torch.ones(1, device=DEVICE))
    assert torch.equal(x, want)
    scale_unless_one(x, torch.full((1,), 3.0, device=DEVICE))
    torch.testing.assert_close(x, (want.float() * 3.0).to(dtype))


def test_triton_all_rows_ignored():
    student, log_t, _ = make_inputs(5, 2, 2, seed=4)
    x = student.float().to(DEVICE).requires_grad_(True)
    loss = distill_loss(x, log_t.float().to(DEVICE), torch.full((5,), -100, device=DEVICE), num_classes=2,
                        n_subclasses=2, alpha=1.0, backend="triton")
    loss.backward()
    assert float(loss.detach()) == 0.0 and not x.grad.abs().any()


# The online loss on the Triton backend (it raised "takes precomputed targets" before): the same
# checks as the CPU/torch backends, one and M teachers, head or given logits, every dtype.
@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
@pytest.mark.parametrize("with_logits", [False, True])
def test_triton_online_targets(with_logits):
    test_ops_loss.test_online_targets_inside_the_kernel("triton", with_logits)


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 67])
def test_triton_online_multi_teacher(dtype, n):
    test_ops_loss.test_online_multi_teacher_mixed_inside_the_kernel("triton", dtype, n)


@pytest.mark.parametrize("name", test_subclass_variants.MAPPED)
def test_triton_runs_every_lelp_variant(name):
    """Issue 22's variants (per-class S with −inf biases, tied GMM, β per class, annealed β, both signs):
    targets and the loss on them, offline and online, against the fp64 reference. The kernels split
    fp32 h and the map into bf16 parts: at the other backends' rtol = 1e-5 the loss's gradient on the
    annealed-β targets is 2.3e-5 off (its bound 2 rtol; measured under the interpreter), so 3e-5."""
    test_subclass_variants.test_variant_targets_and_loss_on_every_backend_match_the_reference("triton", name, DEVICE,
                                                                                               rtol=3e-5)


def test_auto_never_picks_a_backend_that_cannot_run_the_call(monkeypatch):
    """On CUDA tensors auto took Triton even for the online loss, which it could not run."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(_dispatch, "available", lambda backend, device: backend in ("triton", "cuda", "torch"))
    assert _dispatch.resolve("auto", cuda) == "triton"
    assert _dispatch.resolve("auto", cuda, {"triton": "too wide"}) == "cuda"
    with pytest.raises(ValueError, match="triton.*too wide"):
        _dispatch.resolve("triton", cuda, {"triton": "too wide"})
    # Shapes the Triton kernels do not take go to the next backend under auto.
    assert limits.loss_unsupported(2, 256) is None and limits.loss_unsupported(3, 200)
    assert limits.targets_unsupported(17, 1, with_head=True) and not limits.targets_unsupported(17, 1, False)
    assert limits.targets_unsupported(2, 300, with_head=False)


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float16])
def test_triton_kl_gradient_with_low_precision_targets(target_dtype):
    test_ops_loss.test_kl_gradient_with_low_precision_targets("triton", target_dtype)


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
@pytest.mark.parametrize("where", ["targets", "student", "all_targets"])
def test_triton_nan_input_never_gives_a_finite_loss(divergence, where):
    test_ops_loss.test_nan_input_never_gives_a_finite_loss("triton", divergence, where)


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
def test_triton_nan_teacher_weight_never_gives_a_finite_loss():
    test_ops_loss.test_nan_teacher_weight_never_gives_a_finite_loss("triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("shape", [(70, 2, 64), (21, 5, 8)])
def test_triton_kl_alpha_paths(dtype, tau, shape):
    """The hard-label term from the softmax's own exponentials (HARD = 1 at τ = 1, 2 at τ = 2, 3
    otherwise; one piece and two), with the labelled class 400 and 100 below the row max (against
    its own max, its sum never underflows), a target with zeros and an ignored row."""
    test_ops_loss.test_kl_alpha_paths_match_reference("triton", dtype, tau, shape)


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
def test_triton_hard_label_far_below_the_max():
    test_ops_loss.test_hard_label_term_when_the_true_class_is_far_below_the_max("triton")


def test_triton_loss_ignore_index_of_another_jit_kind_is_passed_as_minus_100():
    """An ignore_index the JIT would compile apart (1, a multiple of 16 such as 0, one past 32 bits) is
    passed as -100 with its rows' labels set to -100, and labels of -100 set to -101 (kept, as they
    were); one of -100's kind (-1, 2) is passed as it is."""
    from lelp_fast.kernels.triton.loss import gated_ignore_index

    labels = torch.tensor([0, 1, -100, 2, -101, 2**40])
    for ignore_index, want in [(0, [-100, 1, -101, 2, -101, 2**40]), (1, [0, -100, -101, 2, -101, 2**40]),
                               (2**40, [0, 1, -101, 2, -101, -100])]:
        got, passed = gated_ignore_index(labels, ignore_index)
        assert passed == -100 and got.tolist() == want, (ignore_index, got)
    for ignore_index in (-1, 2, -100):
        got, passed = gated_ignore_index(labels, ignore_index)
        assert got is labels and passed == ignore_index
    assert gated_ignore_index(None, 0) == (None, -100)


@pytest.mark.parametrize("divergence", ["kl", "js"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("ignore_index", [1, 0, 2])
def test_triton_hard_term_with_a_class_as_ignore_index_and_nan(monkeypatch, divergence, tau, ignore_index):
    """ignore_index may be a class (here 1, 0 or 2): its rows are left out, not given a hard term; a NaN
    student logit in a kept row makes that row's loss and gradient NaN. The kernel is given -100 with
    those rows' labels set to it (1 and 0 the JIT would compile apart, a constant and a multiple of 16:
    launches the gates never compiled) or the class itself (2)."""
    import lelp_fast.kernels.triton.loss as triton_loss

    launches = _record_launch_arguments(monkeypatch, triton_loss, "lelp_loss_kernel")
    student, log_t, labels = make_inputs(12, 3, 4, seed=21)
    labels[:4] = torch.tensor([1, 0, 2, 1])
    kw = dict(num_classes=3, n_subclasses=4, tau=tau, alpha=0.5, ignore_index=ignore_index, reduction="none")
    x = student.float().to(DEVICE).requires_grad_(True)
    loss = distill_loss(x, log_t.float().to(DEVICE), labels.to(DEVICE), divergence=divergence, backend="triton", **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    want, want_grad = reference_loss_and_grad(x.detach().cpu(), log_t.float(), labels,
                                              divergence_kind=divergence, **kw)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(loss.detach().cpu().double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=atol * 2, rtol=rtol * 10)
    nan_row, *kept = [row for row in (2, 0, 1, 3) if labels[row] != ignore_index]
    student[nan_row, 5] = float("nan")
    x = student.float().to(DEVICE).requires_grad_(True)
    loss = distill_loss(x, log_t.float().to(DEVICE), labels.to(DEVICE), divergence=divergence, backend="triton",
                        check_inputs=False, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isnan(loss[nan_row]) and torch.isnan(grad[nan_row]).all() and torch.isfinite(loss[kept]).all()
    given = [args[13] for args in launches]  # the ignore_index each launch passed its kernel
    assert given and set(given) == {-100 if ignore_index in (0, 1) else ignore_index}, given


def test_triton_hard_mode_follows_alpha_and_tau():
    from lelp_fast.kernels.triton.loss import hard_mode

    assert [hard_mode(0.0, 1.0, True), hard_mode(0.3, 1.0, False)] == [0, 0]
    assert [hard_mode(0.3, 1.0, True), hard_mode(0.3, 2.0, True), hard_mode(0.3, 1.5, True)] == [1, 2, 3]


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
def test_triton_one_subclass_with_huge_projection():
    test_ops_targets.test_one_subclass_with_huge_projection_keeps_the_class_probability("triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
@pytest.mark.parametrize("jsd_beta", [0.0, 0.1, 0.5, 1.0])
def test_triton_generalised_jsd(jsd_beta):
    test_ops_loss.test_generalised_jsd_matches_reference("triton", jsd_beta, torch.float32)


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_soft_and_hard_parts(reduction):
    test_ops_loss.test_soft_and_hard_parts_come_from_the_same_pass("triton", reduction)


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_triton_subclass_weight(weight):
    test_ops_loss.test_subclass_weight_matches_the_reference("triton", torch.float32, weight, "mean")


def test_persistent_grid_takes_the_sm_count_of_the_tensors_device(monkeypatch):
    """cuda:0 took the current device's SM count (``device.index or current_device()``: index 0 is falsy)."""
    from lelp_fast.kernels.triton import targets as triton_targets

    seen = []
    monkeypatch.setattr(triton_targets, "_sm_count", lambda index: seen.append(index) or 10)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    triton_targets.row_programs(10**6, torch.device("cuda", 0))
    triton_targets.row_programs(10**6, torch.device("cuda"))
    assert seen == [0, 1]


class _LoadedAddresses:
    """Stands in for the interpreter's masked load: keeps the address of every element it reads."""

    def __init__(self, real):
        self.real, self.addresses = real, []

    def __call__(self, builder, ptrs, mask, other, *args):
        self.addresses.append(ptrs.data[mask.data.astype(bool)].ravel().copy())
        return self.real(builder, ptrs, mask, other, *args)

    def _inside(self, t: torch.Tensor):
        import numpy as np

        got = np.concatenate(self.addresses).astype(np.int64)
        return (got >= t.data_ptr()) & (got < t.data_ptr() + t.numel() * t.element_size())

    def reads_of(self, t: torch.Tensor) -> int:
        """Elements read within ``t``'s storage (each read counted)."""
        return int(self._inside(t).sum())

    def all_inside(self, tensors) -> bool:
        """Whether every read lies within one of ``tensors`` (none past a map's stored columns)."""
        inside = self._inside(tensors[0])
        for t in tensors[1:]:
            inside |= self._inside(t)
        return bool(inside.all())


# (C, S, with the head): the stored columns of the subclass map and of the head (None: given logits),
# worked out by hand from the padded grid (limits.padded_grid) and the launcher's programs.
STORED_MAP_COLUMNS = {
    (5, 8, True): (40, 8), (5, 8, False): (40, None),  # an 8 x 8 grid: 64 columns, 24 of padding
    (3, 5, True): (24, 8),  # 4 x 8: 32
    (5, 3, True): (24, 8),  # 8 x 4: 32; 20 real columns rounded up to 8
    (3, 1, True): (8, 16),  # 16 x 1 (a full tensor-core tile): 16; its 16 padded classes keep a 16-column head
    (9, 7, True): (80, 16),  # 16 x 8 in two programs of 64: 72 real columns rounded up to 16
    (7, 16, True): (112, 8),  # 8 x 16 in programs of 64 (padded: not a whole grid)
    (2, 8, True): (16, 8), (4, 4, False): (16, None),  # whole grids: nothing to drop but the head's columns
    (2, 64, True): (128, 16), (15, 7, True): (128, 16),  # a 128-column program; 120 real columns rounded to 16
}


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the kernel's loads under the interpreter")
@pytest.mark.parametrize("grid", list(STORED_MAP_COLUMNS), ids=[f"{c}x{s}-{'head' if h else 'logits'}"
                                                                 for c, s, h in STORED_MAP_COLUMNS])
def test_triton_targets_read_no_padding_class_of_the_map(monkeypatch, grid):
    """The map streams from L2 once per row tile, the kernel's largest stream: each tile reads the
    stored map once, the subclass columns of the real classes (``sub_width``: 40 of the 8 x 8 grid's
    64 at 5 x 8; rounded up to 16 beyond 64 columns, where two programs read a row) and a head of 8
    columns for at most 8 (padded) classes, not 16 (but on the grids taken in programs of 128 columns,
    here 2 x 64: its mask spilled there). Before 2026-12-05 every tile read the whole padded grid and a
    16-column head (the padding as zeros): 1.67x the map's bytes at 5 x 8 with the head."""
    from triton.runtime import interpreter
    from lelp_fast.kernels.triton import targets as tt

    splits = []
    real_split = tt.split_map
    monkeypatch.setattr(tt, "split_map", lambda *a, **kw: splits.append(real_split(*a, **kw)) or splits[-1])
    loads = _LoadedAddresses(interpreter.InterpreterBuilder.create_masked_load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load",
                        lambda builder, *a: loads(builder, *a))
    (c, s, with_head), n, d = grid, 300, 80
    width, head = STORED_MAP_COLUMNS[grid]
    h, weight, bias, logits = random_map(n, d, c, s, with_head, seed=c * s)
    h, z = h.bfloat16(), None if logits is None else logits.bfloat16()
    got = lelp_targets(h, weight.float(), bias.float(), c, s, teacher_logits=z, beta=0.8, tau=1.3, backend="triton")
    torch.testing.assert_close(got.double(), fp64_reference(h, weight, bias, z, c, s, 0.8, 1.3), atol=2e-4, rtol=1e-4)
    (split,) = splits
    assert loads.all_inside([t for t in (h, z, *split[:8]) if t is not None])
    p = tt.plan(d, c, s, torch.bfloat16, with_head)
    tiles = sum(-(-(stop - start) // p.config.block_n) for start, stop in limits.row_pieces(n))  # 288 + 12 rows
    assert split.sub_hi.shape == split.sub_lo.shape == (d, width)
    assert loads.reads_of(split.sub_hi) == loads.reads_of(split.sub_lo) == tiles * d * width
    if with_head:
        assert split.head_hi.shape == split.head_lo.shape == (d, head)
        assert loads.reads_of(split.head_hi) == loads.reads_of(split.head_lo) == tiles * p.groups * d * head


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the host-side splits under the interpreter")
def test_triton_targets_split_the_map_once_per_weight_and_version(monkeypatch):
    """The hi + lo split was redone on every call (~55 small kernels per teacher per step on a GPU);
    it is cached per weight tensor, dtype and device, and redone after the weight changes in place
    or a refit makes new tensors."""
    from lelp_fast._derived import cached_count
    from lelp_fast.kernels.triton import targets as triton_targets

    calls = []
    real = triton_targets.split_map
    monkeypatch.setattr(triton_targets, "split_map", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    h, weight, bias, _ = random_map(9, 20, 3, 4, True, seed=11)
    h, weight, bias = h.bfloat16(), weight.float(), bias.float()

    def run_and_check():
        got = lelp_targets(h, weight, bias, 3, 4, beta=0.8, tau=1.3, backend="triton")
        want = fp64_reference(h, weight.double(), bias.double(), None, 3, 4, beta=0.8, tau=1.3)
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)

    run_and_check()
    run_and_check()
    assert len(calls) == 1
    weight.mul_(1.5)  # in place: the version counter moves
    run_and_check()
    assert len(calls) == 2
    assert cached_count(weight) == 1  # the new version replaces the old split (it was kept beside it before)
    bias.add_(0.25)
    run_and_check()
    assert len(calls) == 3 and cached_count(weight) == 1
    lelp_targets(h.half(), weight, bias, 3, 4, beta=0.8, tau=1.3, backend="triton")  # another dtype
    assert len(calls) == 4 and cached_count(weight) == 2
    weight, bias = weight.clone(), bias.clone()  # a refit: new tensors
    run_and_check()
    assert len(calls) == 5


# The subclass weight λ ≠ 1 in the loss kernel's own pass (SUBCLASS_WEIGHTED; issue 21: it was two
# calls of the λ = 1 kernel, one on torch-pooled class logits).
def _weighted_inputs(n, c, s, seed):
    student, log_t, labels = make_inputs(n, c, s, seed=seed)
    student[1, s:2 * s] -= 300.0  # class 1 of row 1 ~300 below the row max: its q underflows in fp32
    student[3, labels[3] * s:(labels[3] + 1) * s] -= 200.0  # the labelled class far below (the alpha term)
    log_t[4, :s] = float("-inf")  # a class with no target mass
    log_t[4] = torch.log_softmax(log_t[4], 0)
    labels[2] = -100
    return student, log_t, labels


def _weighted_reference(x, log_t, labels, c, s, tau, weight, alpha):
    ref = x.detach().cpu().double().requires_grad_(True)
    rows = reference.subclass_weighted_kl(ref, log_t.double(), c, s, tau, weight)
    rows = rows + alpha * reference.hard_label_rows(ref, labels, c, s)
    rows = torch.where(labels != -100, rows, torch.zeros_like(rows))
    (grad,) = torch.autograd.grad(rows.sum(), ref)
    return rows.detach(), grad


@pytest.fixture
def loss_launches(monkeypatch):
    """Counts the loss kernel's launches (``_loss_rows_triton`` imports the launcher at each call)."""
    from lelp_fast.kernels.triton import loss as triton_loss

    calls = []
    real = triton_loss.loss_triton
    monkeypatch.setattr(triton_loss, "loss_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(21, 3, 5), (9, 2, 20), (13, 3, 4), (7, 2, 8), (6, 16, 2), (8, 11, 3),
                                   (5, 12, 10), (6, 16, 5), (9, 9, 7), (7, 5, 12), (6, 9, 9)])
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.7])
def test_triton_subclass_weight_in_one_launch(loss_launches, dtype, shape, tau):
    """λ in {0, 0.1, 0.3, 2}, with and without the hard-label term (τ = 1 and 2 reuse the softmax's
    exponentials, 0.7 takes its own), each form of the class tile: S a power of two (contiguous rows:
    3 x 4 with a padded class, 2 x 8, 16 x 2 the most classes) and not (gathered classes, each
    thread holding G of them: 3 x 5 a whole row per thread, 2 x 20 one class per thread, 11 x 3 a
    whole row of 11 classes in 16 slots per thread, 12 x 10 three in 4 slots on 4 threads, 16 x 5
    four on 4, 9 x 7 five on 2, 5 x 12 three on 2 (one padded class on the second of each), 9 x 9
    three on 4, the last holding only padding): one launch, loss and gradient against the fp64 formula, with an
    ignored row, a class whose q underflows against the row max (exact: its share of the class
    term is taken against its own max), a labelled class 200 below the rest, a class with no target
    mass. Before: two launches (the λ = 1 kernel on the full and on the pooled logits)."""
    n, c, s = shape
    student, log_t, labels = _weighted_inputs(n, c, s, seed=n + s)
    atol, rtol = TOL[dtype]
    for weight in (0.0, 0.1, 0.3, 2.0):
        for alpha in (0.0, 0.3):
            x = student.to(dtype).to(DEVICE).requires_grad_(True)
            del loss_launches[:]
            loss = distill_loss(x, log_t.to(dtype).to(DEVICE), labels.to(DEVICE), num_classes=c, n_subclasses=s,
                                tau=tau, alpha=alpha, subclass_weight=weight, backend="triton", reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), x)
            assert len(loss_launches) == 1, (weight, alpha)
            want, want_grad = _weighted_reference(x, log_t.to(dtype), labels, c, s, tau, weight, alpha)
            torch.testing.assert_close(loss.detach().cpu().double(), want, atol=atol * 4, rtol=rtol)
            torch.testing.assert_close(grad.cpu().double(), want_grad, atol=atol * 2, rtol=rtol * 10)


class _KeepsRegisterCaps:
    """Stands in for the loss kernel: launches it, and keeps the register cap each launch passed."""

    def __init__(self, kernel):
        self.kernel, self.caps = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.caps.append(kwargs.get("maxnreg"))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_no_register_cap_is_passed_on_amd_gpus(monkeypatch):
    """Triton's AMD backend refuses ``maxnreg``: under a ROCm build of torch (``torch.version.hip``)
    the launch that takes a cap on NVIDIA GPUs (12 x 10 with two teachers) passes none."""
    from lelp_fast.kernels.triton import loss as triton_loss

    ce = dict(SUBCLASS_WEIGHTED=True, HAS_WEIGHTS=True, BLOCK_K=triton_loss.weighted_block_shape(12, 10, True)[1])
    monkeypatch.setattr(torch.version, "hip", None)
    assert triton_loss.register_cap_option(ce) == {"maxnreg": triton_loss.WEIGHTED_MAX_REGISTERS}
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert triton_loss.register_cap_option(ce) == {}
    assert triton_loss.register_cap_option(dict(ce, HAS_WEIGHTS=False)) == {}


@pytest.mark.parametrize("layout", ["installed", "other"])
@pytest.mark.parametrize("shape", [(21, 3, 5), (8, 11, 3), (5, 12, 10)])
def test_triton_subclass_weight_gathered_tile_layouts_and_teachers(monkeypatch, loss_launches, layout, shape):
    """The gathered class tile (S not a power of two) as the launcher lays it out under the installed
    Triton and under the other (ROW_AXIS flipped: Triton 3.6 puts the classes on the first axis and
    transposes the tile, which the interpreter of 3.9 does not otherwise run), with the α term at
    any τ, and with two teachers mixed by per-row weights in the kernel: loss and gradient against
    the fp64 formula, one launch each; 12 x 10 with two teachers passes a register cap (``maxnreg``,
    ``loss.max_registers``), the others none."""
    from lelp_fast.kernels.triton import loss as triton_loss

    if layout == "other":
        monkeypatch.setattr(triton_loss, "ROW_AXIS", 1 - triton_loss.ROW_AXIS)
    launched = _KeepsRegisterCaps(triton_loss.lelp_loss_kernel)
    monkeypatch.setattr(triton_loss, "lelp_loss_kernel", launched)
    n, c, s = shape
    student, log_t, labels = _weighted_inputs(n, c, s, seed=n)
    student, log_t = student.float(), log_t.float()
    kw = dict(num_classes=c, n_subclasses=s, tau=0.7, alpha=0.3, subclass_weight=0.1, backend="triton",
              reduction="none")
    x = student.to(DEVICE).requires_grad_(True)
    loss = distill_loss(x, log_t.to(DEVICE), labels.to(DEVICE), **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert len(loss_launches) == 1
    want, want_grad = _weighted_reference(x, log_t, labels, c, s, 0.7, 0.1, 0.3)
    torch.testing.assert_close(loss.detach().cpu().double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=4e-5, rtol=1e-3)
    g = torch.Generator().manual_seed(s)
    two = torch.stack([log_t, torch.log_softmax(torch.randn(n, c * s, generator=g), -1)], 1)
    weights = torch.rand(n, 2, generator=g)
    weights = weights / weights.sum(1, keepdim=True)
    del loss_launches[:]
    x = student.to(DEVICE).requires_grad_(True)
    loss = distill_loss(x, two.to(DEVICE), labels.to(DEVICE), teacher_weights=weights.to(DEVICE), **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert len(loss_launches) == 1
    pieces = len(limits.row_pieces(n))  # launches of a multiple of 16 rows and a tail (21 rows: 16 and 5)
    assert launched.caps == [None] * pieces + [triton_loss.WEIGHTED_MAX_REGISTERS if shape == (5, 12, 10) else None] * pieces
    mixed = reference.mix_log_targets(two.double(), weights.double()).float()
    want, want_grad = _weighted_reference(x, mixed, labels, c, s, 0.7, 0.1, 0.3)
    torch.testing.assert_close(loss.detach().cpu().double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=4e-5, rtol=1e-3)


@pytest.mark.parametrize("shape", [(2, 4), (3, 5)])
def test_triton_subclass_weight_one_row_huge_logits(loss_launches, shape):
    """One row (one program, the rest of its tile masked), logits of ±1e4 (every class but the top
    one underflows against the row max; each class's share is exact against its own max) at τ = 2
    with the α term: one launch, against the fp64 formula."""
    c, s = shape
    g = torch.Generator().manual_seed(c * s)
    student = torch.randn(1, c * s, generator=g) * 1e4
    log_t = torch.log_softmax(torch.randn(1, c * s, generator=g) * 3, -1)
    labels = torch.tensor([c - 1])
    x = student.to(DEVICE).requires_grad_(True)
    loss = distill_loss(x, log_t.to(DEVICE), labels.to(DEVICE), num_classes=c, n_subclasses=s, tau=2.0, alpha=0.3,
                        subclass_weight=0.1, backend="triton", reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert len(loss_launches) == 1
    want, want_grad = _weighted_reference(x, log_t, labels, c, s, 2.0, 0.1, 0.3)
    torch.testing.assert_close(loss.detach().cpu().double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="the shared tests build CPU tensors")
def test_triton_subclass_weight_mean_mixed_and_online(loss_launches):
    """The folded mean (the gradient written once in the student's dtype), mixed teachers and online
    teachers (the shared tests: each one launch now)."""
    test_ops_loss.test_subclass_weight_matches_the_reference("triton", torch.bfloat16, 0.3, "mean")
    assert len(loss_launches) == 1
    test_ops_loss.test_subclass_weight_takes_mixed_and_online_targets("triton")
    assert len(loss_launches) == 4


def test_triton_subclass_weight_nan_rows_sum_and_many_classes(loss_launches):
    """A NaN row (NaN loss and gradient in that row only), the sum without labels in one launch;
    more classes than MAX_FUSED_WEIGHTED_CLASSES keep the two calls. (Split from the shared tests,
    which build CPU tensors: on the H200 the whole test failed at its first line, 2026-12-04.)"""
    for s in (3, 4):  # gathered classes, contiguous rows
        student, log_t, labels = _weighted_inputs(6, 4, s, seed=2)
        student[5, 7] = float("nan")
        x = student.float().to(DEVICE).requires_grad_(True)
        loss = distill_loss(x, log_t.float().to(DEVICE), labels.to(DEVICE), num_classes=4, n_subclasses=s, alpha=0.3,
                            tau=2.0, subclass_weight=0.1, backend="triton", check_inputs=False, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isnan(loss[5]) and torch.isnan(grad[5]).all()
        assert torch.isfinite(loss[:5]).all() and torch.isfinite(grad[:5]).all()
    student, log_t, labels = _weighted_inputs(6, 4, 3, seed=2)
    del loss_launches[:]  # no labels (every row kept), the sum
    x = student.float().to(DEVICE).requires_grad_(True)
    loss = distill_loss(x[:5], log_t[:5].float().to(DEVICE), num_classes=4, n_subclasses=3, tau=1.3,
                        subclass_weight=0.1, backend="triton", reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    assert len(loss_launches) == 1
    want, want_grad = _weighted_reference(x[:5], log_t[:5].float(), torch.zeros(5, dtype=torch.long), 4, 3, 1.3,
                                          0.1, 0.0)
    torch.testing.assert_close(loss.detach().cpu().double(), want.sum(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad[:5].cpu().double(), want_grad, atol=4e-5, rtol=1e-3)
    c = limits.MAX_FUSED_WEIGHTED_CLASSES + 1
    student, log_t, labels = make_inputs(7, c, 2, seed=c)
    del loss_launches[:]
    x = student.float().to(DEVICE).requires_grad_(True)
    loss = distill_loss(x, log_t.float().to(DEVICE), labels.to(DEVICE), num_classes=c, n_subclasses=2, tau=1.5,
                        subclass_weight=0.1, backend="triton", reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert len(loss_launches) == 2
    want, want_grad = _weighted_reference(x, log_t.float(), labels, c, 2, 1.5, 0.1, 0.0)
    torch.testing.assert_close(loss.detach().cpu().double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=4e-5, rtol=1e-3)


# (rows, classes) of vanilla KD targets: one class and one row, rows of 2 to 512 classes whole or
# not a power of two (C = 300: the H200's 9.1x-the-floor launch), more rows than one program holds;
# rows as half their padded tile and a tail of 1, 2 and 4 chunks (kd_targets.tail: 5, 9, 17, 33, 65,
# 161, 270, 321; 65 and 77 on 16 lanes, 90 on 32), and padded as one piece (7, 30, 200, 385).
KD_SHAPES = [(1, 1), (1, 2), (37, 3), (130, 17), (9, 64), (33, 300), (5, 512), (3000, 2), (70, 127), (45, 5),
             (19, 9), (21, 33), (10, 65), (6, 161), (5, 270), (4, 321), (3, 385), (11, 7), (5, 30), (3, 200),
             (13, 77), (7, 90)]


def test_kd_targets_tiles_cover_every_row_once():
    """For every C the launcher takes: the padded row covers the C classes, the first C_PAD / 2 columns
    (loaded unmasked where there is a tail) are all classes, and the tail is the fewest chunks, in a
    power of two, that hold the rest (fewer than half the row's chunks): its padding is under one chunk,
    or half the tail."""
    from lelp_fast.kernels.triton import kd_targets

    for c in range(1, 513):
        ce = kd_targets.launch_constexprs(c)
        c_pad, lanes, tail = ce["C_PAD"], ce["LANES"], ce["TAIL"]
        assert c_pad >= c and c_pad & (c_pad - 1) == 0 and c_pad % lanes == 0 and ce["BLOCK_N"] * c_pad <= 1024, c
        if tail:
            chunks = c_pad // lanes
            assert tail & (tail - 1) == 0 and tail < chunks // 2, c
            assert c_pad // 2 < c <= c_pad // 2 + tail * lanes, c
            assert c_pad // 2 + tail * lanes - c < max(1, tail // 2) * lanes, c


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", KD_SHAPES)
def test_triton_vanilla_kd_targets_match_reference(shape, dtype, out_dtype):
    """S = 1 with given logits: ``kd_targets``' kernel, from the logits alone (NaN embeddings, never
    read, give finite targets; the LELP kernel read h and gave NaN rows), against the fp64 reference."""
    n, c = shape
    g = torch.Generator().manual_seed(n * 1000 + c)
    z = (torch.randn(n, c, generator=g) * 4).to(dtype)
    h = torch.full((n, 20), float("nan"), dtype=dtype, device=DEVICE)
    weight, bias = torch.randn(20, c, generator=g).to(DEVICE), torch.randn(c, generator=g).to(DEVICE)
    out = torch.full((n, c), float("nan"), dtype=out_dtype, device=DEVICE)  # poisoned
    got = lelp_targets(h, weight, bias, c, 1, teacher_logits=z.to(DEVICE), beta=0.7, tau=1.3, backend="triton",
                       out=out)
    want = fp64_reference(torch.zeros(n, 20), weight.cpu().double(), bias.cpu().double(), z, c, 1, 0.7, 1.3)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=torch.finfo(out_dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_vanilla_kd_targets_at_the_edges(dtype):
    """Huge logits (1e30) and a tiny τ, -inf logits (a target of 0: -inf) in the first half and in the
    tail, a row of -inf and NaNs in either piece (NaN rows, as the reference), the others untouched and
    at most 0; rows 141 logits apart, not 130."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(40, 130, generator=g) * 3
    z[3] *= 1e30
    z[7, [0, 99]] = float("-inf")
    z[7, 128] = float("-inf")  # in the tail (kd_targets.tail: the first 128 columns, then one chunk of 32)
    z[11] = float("-inf")
    z[12, 5] = float("nan")
    z[13, 129] = float("nan")
    wide = torch.zeros(40, 141)
    wide[:, :130] = z
    z_in = wide.to(dtype)[:, :130].to(DEVICE)  # rows 141 apart
    for tau in (1.0, 1e-3):
        got = lelp_targets(torch.zeros(40, 8, device=DEVICE), torch.zeros(8, 130, device=DEVICE),
                           torch.zeros(130, device=DEVICE), 130, 1, teacher_logits=z_in, tau=tau, backend="triton",
                           check_inputs=False).cpu().double()
        want = torch.log_softmax(z_in.cpu().double() / tau, dim=1)
        assert got[[11, 12, 13]].isnan().all() and want[[11, 12, 13]].isnan().all()
        keep = [i for i in range(40) if i not in (11, 12, 13)]
        assert torch.equal(torch.isneginf(got[keep]), torch.isneginf(want[keep]))
        # fp32 math: z / τ - lse errs by a few ulps of the row's largest |z / τ|
        zt = z_in.cpu().double()[keep] / tau
        scale = torch.where(torch.isfinite(zt), zt.abs(), 0.0).amax(dim=1, keepdim=True).clamp(min=1.0)
        finite = torch.isfinite(want[keep])
        assert ((got[keep] - want[keep]).abs() <= 2.0**-21 * scale)[finite].all()
        assert (got[keep][finite] <= 0).all()  # a log-probability: z/τ - m/τ in one FFMA gave +1e26 on a GPU


def test_triton_vanilla_kd_targets_take_float64_embeddings(monkeypatch):
    """Vanilla KD's targets read no embeddings, so their dtype does not bar the Triton backend (fp64
    embeddings were refused with backend="triton", and sent to torch under auto)."""
    from lelp_fast.kernels.triton import kd_targets

    launches, real = [], kd_targets.kd_targets_triton
    monkeypatch.setattr(kd_targets, "kd_targets_triton", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(13)
    z = (torch.randn(40, 7, generator=g) * 3).to(DEVICE)
    h = torch.randn(40, 12, generator=g, dtype=torch.float64).to(DEVICE)
    w, b = torch.randn(12, 7, generator=g).to(DEVICE), torch.randn(7, generator=g).to(DEVICE)
    got = lelp_targets(h, w, b, 7, 1, teacher_logits=z, tau=1.5, backend="triton")
    assert len(launches) == 1
    torch.testing.assert_close(got.cpu().double(), torch.log_softmax(z.cpu().double() / 1.5, 1), atol=1e-6, rtol=0)


def test_triton_online_loss_of_vanilla_kd_reads_no_embeddings():
    """The online loss (embeddings with given logits, S = 1) takes the KD targets kernel too: its loss
    and gradient are those of the loss against ``log_softmax(z / τ)``, whatever the embeddings hold."""
    g = torch.Generator().manual_seed(12)
    n, c = 50, 5
    s = torch.randn(n, c, generator=g)
    z = torch.randn(n, c, generator=g) * 3
    h = torch.full((n, 16), float("nan"))
    w, b = torch.randn(16, c, generator=g), torch.randn(c, generator=g)
    kw = dict(num_classes=c, n_subclasses=1, tau=2.0, backend="triton", check_inputs=False)
    x = s.clone().to(DEVICE).requires_grad_(True)
    loss = distill_loss(x, embeddings=h.to(DEVICE), fused_weight=w.to(DEVICE), fused_bias=b.to(DEVICE),
                        teacher_logits=z.to(DEVICE), beta=0.5, **kw)
    loss.backward()
    y = s.clone().to(DEVICE).requires_grad_(True)
    want = distill_loss(y, torch.log_softmax(z / 2.0, dim=1).to(DEVICE), **kw)
    want.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-7, rtol=1e-5)



def test_triton_vanilla_kd_targets_in_several_launches(monkeypatch):
    """More rows than one launch takes (``kd_targets.ROW_CHUNK``, 2**30: the kernel's row index is int32)
    go in several launches, each from its first row; here 16 rows a launch, into a strided output."""
    from lelp_fast.kernels.triton import kd_targets

    monkeypatch.setattr(kd_targets, "ROW_CHUNK", 16)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(50, 5, generator=g).to(DEVICE)
    out = torch.full((50, 2, 5), float("nan"), device=DEVICE)[:, 1]  # rows 10 apart
    kd_targets.kd_targets_triton(z, 1.3, out)
    torch.testing.assert_close(out.cpu().double(), torch.log_softmax(z.cpu().double() / 1.3, 1), atol=1e-6, rtol=0)


def _record_launch_arguments(monkeypatch, module, name: str) -> list:
    """The positional arguments of each launch of ``module``'s kernel ``name`` from now on (the
    interpreter's launches: the kernel is called directly there)."""
    given, kernel = [], getattr(module, name)

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                given.append(args)
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Recording())
    return given


def _off_16_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view with contiguous rows whose first element is one element past 16 bytes."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    return flat.view(t.shape).copy_(t)


def _rows_of(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t``'s values in a view whose rows lie ``width`` elements apart (a slice of a wider buffer)."""
    wide = torch.full((t.shape[0], width), float("nan"), dtype=t.dtype, device=t.device)
    wide[:, :t.shape[1]] = t
    return wide[:, :t.shape[1]]


def _kinds_as_gated(args, strides) -> bool:
    """Whether a launch passed every tensor on 16 bytes and each (stride position, columns) a row
    stride of the kind of contiguous rows of that many columns (what the gates compile)."""
    aligned = all(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor))
    return aligned and all(limits.jit_kind(args[i]) == limits.jit_kind(columns) for i, columns in strides)


# (embeddings view, teacher logits view, output view): views whose launch Triton's JIT compiles apart
# from contiguous rows' (a pointer off 16 bytes, a row stride of another kind), and one it does not (rows
# 53 apart at d = 50: no multiple of 16 either way).
TARGETS_VIEWS = [("off", None, None), ("wide", None, None), (None, "off", None), (None, "wide16", None),
                 (None, None, "off"), (None, None, "teacher"), ("wide", "wide16", "teacher")]


@pytest.mark.skipif(DEVICE != "cpu", reason="records the interpreter's launches (a GPU's go through the autotuner)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 50])
@pytest.mark.parametrize("with_head, views", [(head, vs) for head in (True, False) for vs in TARGETS_VIEWS
                                              if not (head and vs[1])],
                         ids=[f"{'head' if head else 'logits'}-" + "-".join(str(v) for v in vs)
                              for head in (True, False) for vs in TARGETS_VIEWS if not (head and vs[1])])
def test_triton_targets_of_views_launch_as_gated(monkeypatch, dtype, d, with_head, views):
    """Embeddings, logits and outputs given as views (a pointer off 16 bytes, rows of a wider buffer, the
    online loss's slice of one teacher of two at K = 40) give the targets of contiguous inputs, bit for
    bit, and the kernel is launched only as the gates compile it: every pointer on 16 bytes, every row
    stride of contiguous rows' kind (``gated``). Before, the views went to the kernel as they were:
    kernels Triton's JIT compiles apart, which no gate compiled (one spilled 64 B on sm_80 in a one-off
    compile, with its output off 16 bytes)."""
    from lelp_fast.kernels.triton import targets as tt

    n, c, s = 37, 5, 8
    h, weight, bias, logits = random_map(n, d, c, s, with_head, seed=d + c)
    h, z = h.to(dtype).to(DEVICE), None if logits is None else logits.to(dtype).to(DEVICE)
    w, b = weight.float().to(DEVICE), bias.float().to(DEVICE)
    want = torch.full((n, c * s), float("nan"), device=DEVICE)
    tt.targets_triton(h, w, b, c, s, z, 0.8, 1.3, want)
    h_view, z_view, out_view = views
    h_in = {"off": _off_16_bytes, "wide": lambda t: _rows_of(t, d + 3)}.get(h_view, lambda t: t)(h)
    z_in = z if z is None else {"off": _off_16_bytes, "wide16": lambda t: _rows_of(t, 16)}.get(z_view, lambda t: t)(z)
    buffer = torch.full((n, 2, c * s), float("nan"), device=DEVICE)
    out = {"off": lambda: _off_16_bytes(want.clone().fill_(float("nan"))), "teacher": lambda: buffer[:, 1]}.get(
        out_view, lambda: torch.full_like(want, float("nan")))()
    given = _record_launch_arguments(monkeypatch, tt, "lelp_targets_kernel")
    got = tt.targets_triton(h_in, w, b, c, s, z_in, 0.8, 1.3, out)
    assert got is out and torch.equal(out, want)
    assert torch.isnan(buffer[:, 0]).all()  # the other teacher's slice is left as it was
    z_columns = c if z is not None else d
    for args in given:  # 32 rows and a tail of 5 (limits.row_pieces)
        assert _kinds_as_gated(args, [(1, d), (11, z_columns), (13, c * s)]), [
            (a.data_ptr() % 16, a.stride()) if isinstance(a, torch.Tensor) else a for a in args[:14]]
    assert [args[14] for args in given] == [32, 5]


@pytest.mark.parametrize("views", [("off", None), ("wide16", None), (None, "off"), (None, "wide16")])
def test_triton_kd_targets_of_views_launch_as_gated(monkeypatch, views):
    """Vanilla KD targets of logits and into outputs given as views: the targets of contiguous rows, bit
    for bit, launched only as the gates compile the kernel (``gated``)."""
    from lelp_fast.kernels.triton import kd_targets

    n, c = 37, 5
    z = torch.randn(n, c, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    want = kd_targets.kd_targets_triton(z, 1.3, torch.full((n, c), float("nan"), device=DEVICE))
    z_view, out_view = views
    view = {"off": _off_16_bytes, "wide16": lambda t: _rows_of(t, 16)}
    z_in = view.get(z_view, lambda t: t)(z)
    out = view.get(out_view, lambda t: t)(torch.full((n, c), float("nan"), device=DEVICE))
    given = _record_launch_arguments(monkeypatch, kd_targets, "kd_targets_kernel")
    assert kd_targets.kd_targets_triton(z_in, 1.3, out) is out and torch.equal(out, want)
    assert [args[4] for args in given] == [32, 5] and all(_kinds_as_gated(args, [(1, c), (3, c)]) for args in given)


def test_triton_loss_of_views_launches_as_gated(monkeypatch):
    """A loss whose student logits, targets, teacher weights and labels are contiguous views off 16 bytes:
    the loss and gradient of fresh tensors, bit for bit, each pointer the kernel gets on 16 bytes."""
    import lelp_fast.kernels.triton.loss as triton_loss

    student, log_t, labels = make_inputs(29, 3, 4, seed=5)
    log_t = torch.stack([log_t, log_t.roll(1, 0)], 1)
    weights = torch.rand(29, 2, generator=torch.Generator().manual_seed(6))
    weights = weights / weights.sum(1, keepdim=True)
    kw = dict(num_classes=3, n_subclasses=4, tau=2.0, alpha=0.5, reduction="none", backend="triton")

    def loss_and_grad(s, t, w, y):
        x = s.float().to(DEVICE).requires_grad_(True)
        loss = distill_loss(x, t.float().to(DEVICE), y.to(DEVICE), teacher_weights=w.to(DEVICE), **kw)
        return loss.detach(), torch.autograd.grad(loss.sum(), x)[0]

    want = loss_and_grad(student, log_t, weights, labels)
    given = _record_launch_arguments(monkeypatch, triton_loss, "lelp_loss_kernel")
    got = loss_and_grad(*(_off_16_bytes((t.float() if t.is_floating_point() else t).to(DEVICE))
                          for t in (student, log_t, weights, labels)))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert given and all(_kinds_as_gated(args, []) for args in given)


@pytest.mark.skipif(DEVICE != "cpu", reason="records the interpreter's launches (a GPU's go through the autotuner)")
def test_triton_targets_loss_and_scale_in_several_launches(monkeypatch):
    """Rows go in launches of a multiple of 16 rows and a tail of fewer (``limits.row_pieces``: the kernel
    the JIT compiles for other counts runs at most 15 rows), each at most ``limits.ROW_CHUNK`` (2**30:
    past 2**31 the JIT would take N as a 64-bit integer, a kernel no gate compiles): here 37 rows as 32
    and 5, then with 16 rows a launch (16 elements for the scale). The results are those of one launch:
    bit for bit but for the targets, whose tile products the interpreter takes from numpy's matmul over
    other row counts (2e-6)."""
    from lelp_fast.kernels.triton import loss as triton_loss, targets as tt

    n, d, c, s = 37, 24, 3, 4
    h, weight, bias, _ = random_map(n, d, c, s, True, seed=2)
    h, w, b = h.float().to(DEVICE), weight.float().to(DEVICE), bias.float().to(DEVICE)
    student, log_t, labels = make_inputs(n, c, s, seed=3)
    student, log_t, labels = student.float().to(DEVICE), log_t.float().to(DEVICE), labels.to(DEVICE)

    def run():
        targets = tt.targets_triton(h, w, b, c, s, None, 0.8, 1.3, torch.full((n, c * s), float("nan"), device=DEVICE))
        rows, hard, grad = (torch.full(shape, float("nan"), device=DEVICE) for shape in ((n,), (n,), (n, c * s)))
        triton_loss.loss_triton(student, log_t, None, labels, c, s, 0, 0.5, 2.0, 0.5, -100, rows, hard, grad)
        scaled = grad.clone()
        triton_loss.scale_unless_one(scaled, torch.full((1,), 0.5, device=DEVICE))
        return targets, rows, hard, grad, scaled

    def counts(launches):
        return {name: [args[at] for args in launches[name]] for name, at in (
            ("lelp_targets_kernel", 14), ("lelp_loss_kernel", 8), ("scale_unless_one_kernel", 2))}

    kernels = ((tt, "lelp_targets_kernel"), (triton_loss, "lelp_loss_kernel"), (triton_loss, "scale_unless_one_kernel"))
    launches = {name: _record_launch_arguments(monkeypatch, module, name) for module, name in kernels}
    want = run()
    assert counts(launches) == {"lelp_targets_kernel": [32, 5], "lelp_loss_kernel": [32, 5],
                                "scale_unless_one_kernel": [432, 12]}, counts(launches)
    for module in (tt, triton_loss):
        monkeypatch.setattr(module, "ROW_CHUNK", 16)
    launches = {name: _record_launch_arguments(monkeypatch, module, name) for module, name in kernels}
    got = run()
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(got[1:], want[1:]))
    assert counts(launches) == {"lelp_targets_kernel": [16, 16, 5], "lelp_loss_kernel": [16, 16, 5],
                                "scale_unless_one_kernel": [16] * 27 + [12]}, counts(launches)


def test_triton_targets_refuse_one_feature():
    """Embeddings of one feature (d = 1) would be a constant to the JIT, a kernel no gate compiles: the
    Triton targets refuse them with the reason, and auto takes another backend (vanilla KD, which reads
    no embeddings, still runs)."""
    h, weight, bias, logits = random_map(5, 1, 2, 3, False, seed=4)
    h, weight, bias, logits = (t.float().to(DEVICE) for t in (h, weight, bias, logits))
    with pytest.raises(ValueError, match=r"at least 2 features \(got d = 1\)"):
        lelp_targets(h, weight, bias, 2, 3, teacher_logits=logits, backend="triton")
    got = lelp_targets(h, weight, bias, 2, 3, teacher_logits=logits, backend="auto")
    torch.testing.assert_close(got.cpu().double(), fp64_reference(h.cpu(), weight.cpu(), bias.cpu(), logits.cpu(), 2, 3,
                                                                  beta=1.0, tau=1.0), atol=1e-5, rtol=1e-5)
    kd = lelp_targets(h, weight[:, :2], bias[:2], 2, 1, teacher_logits=logits, backend="triton")
    torch.testing.assert_close(kd.cpu().double(), torch.log_softmax(logits.cpu().double(), 1), atol=1e-6, rtol=0)


# The class and subclass log-softmaxes at huge scaled values (x / τ or u / β of 5e4-1e6): the kernel
# took x / τ - (max + log Σ), which rounded the log-sum away. Measured under the interpreter before
# 2026-12-06: a row's targets summed to 1.0010 (z = 500, τ = 0.01), 1.0057 (z = 1, τ = 1e-6), 1.00024
# (z = 1e5, τ = 1) and 1.0297 (u = 1, β = 1e-6); z = [3e38, 1, 0] at τ = 0.5 gave NaN targets, which
# the input check refused as an overflow. Now each is shifted by its unscaled max, then scaled.
@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("z_row, tau", test_ops_targets.HUGE_SCALED_LOGITS)
def test_triton_class_log_softmax_of_huge_scaled_logits_stays_normalised(with_head, z_row, tau):
    test_ops_targets.test_class_log_softmax_of_huge_scaled_logits_stays_normalised("triton", with_head, z_row, tau,
                                                                                   DEVICE)


def test_triton_huge_scaled_logits_of_many_classes_stay_normalised():
    test_ops_targets.test_huge_scaled_logits_of_many_classes_stay_normalised("triton", DEVICE)


@pytest.mark.parametrize("with_head", [True, False])
def test_triton_subclass_log_softmax_at_tiny_beta_stays_normalised(with_head):
    test_ops_targets.test_subclass_log_softmax_at_tiny_beta_stays_normalised("triton", with_head, DEVICE)


def test_triton_finite_logits_whose_scaled_value_overflows_give_targets():
    test_ops_targets.test_finite_logits_whose_scaled_value_overflows_give_targets("triton", DEVICE)


@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("s", [2, 1])
@pytest.mark.parametrize("tau", [1e38, 1e46])
def test_triton_a_tau_whose_inverse_is_no_normal_float_gives_uniform_classes(with_head, s, tau):
    test_ops_targets.test_a_tau_whose_inverse_is_no_normal_float_gives_uniform_classes("triton", with_head, s, tau,
                                                                                       DEVICE)
