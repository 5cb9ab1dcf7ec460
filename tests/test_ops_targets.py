"""The targets op: every available backend against the fp64 reference."""

import math

import pytest
import torch

from lelp_fast import reference
from lelp_fast.ops import lelp_targets
from lelp_fast.ops import _dispatch

BACKENDS = ["torch"] + (["cpu", "cuda_emu"] if _dispatch.available("cpu", torch.device("cpu")) else [])
# Tolerances on log-targets, per input dtype: the input is rounded once, math is fp32.
ATOL = {torch.float32: 2e-4, torch.float16: 2e-4, torch.bfloat16: 2e-4}
OUT_ATOL = {torch.float32: 0.0, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def random_map(n, d, num_classes, s, with_head, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    j = num_classes * s + (num_classes if with_head else 0)
    weight = torch.randn(d, j, generator=g, dtype=torch.float64) / d**0.5
    bias = torch.randn(j, generator=g, dtype=torch.float64)
    logits = None if with_head else torch.randn(n, num_classes, generator=g, dtype=torch.float64) * 3
    return h, weight, bias, logits


def fp64_reference(h, weight, bias, logits, num_classes, s, beta, tau):
    """The reference on the inputs exactly as the kernel sees them (rounded to their dtype)."""
    k = num_classes * s
    proj = h.double() @ weight.float().double() + bias.float().double()
    z = proj[:, k:] if logits is None else logits.double()
    return reference.log_targets(proj[:, :k], z, s, beta, tau)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 2, 1), (7, 33, 2, 3), (130, 77, 3, 5), (257, 19, 5, 8), (9, 40, 2, 64)])
@pytest.mark.parametrize("with_head", [True, False])
def test_targets_match_reference(backend, dtype, shape, with_head):
    n, d, num_classes, s = shape
    h, weight, bias, logits = random_map(n, d, num_classes, s, with_head, seed=n * d + s)
    h_in = h.to(dtype)
    z_in = None if logits is None else logits.to(dtype)
    want = fp64_reference(h_in, weight, bias, z_in, num_classes, s, beta=0.8, tau=1.3)
    out = torch.full((n, num_classes * s), float("nan"), dtype=torch.float32)  # poisoned
    got = lelp_targets(
        h_in, weight.float(), bias.float(), num_classes, s, teacher_logits=z_in,
        beta=0.8, tau=1.3, backend=backend, out=out,
    )
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=ATOL[dtype], rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_outputs(backend, out_dtype):
    h, weight, bias, _ = random_map(45, 31, 3, 4, True, seed=2)
    want = fp64_reference(h.float(), weight, bias, None, 3, 4, 1.0, 1.0)
    out = torch.full((45, 12), float("nan"), dtype=out_dtype)
    got = lelp_targets(h.float(), weight.float(), bias.float(), 3, 4, backend=backend, out=out)
    assert got.dtype == out_dtype and torch.isfinite(got).all()
    # One rounding of the fp32 result to the output dtype.
    torch.testing.assert_close(got.double(), want.to(out_dtype).double(), atol=OUT_ATOL[out_dtype], rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_subclass_with_huge_projection_keeps_the_class_probability(backend):
    """S = 1, beta = 0.01, u = 1e4: (log p_c + u/beta) - lse cancelled log p_c (gave -0.6875 twice
    instead of log_softmax(z) = -0.6882, -0.6982); the subclass log-softmax must come first. The class
    logits come from the head (given logits at S = 1 are vanilla KD, which reads no projection)."""
    z = torch.tensor([[0.31, 0.30]])
    h = torch.tensor([[1.0, 0.0]])  # two features: the Triton targets take no d = 1 (limits.targets_unsupported)
    weight = torch.tensor([[1e4, 1e4, 0.31, 0.30], [0.0, 0.0, 0.0, 0.0]])  # u = 1e4 for both classes, S = 1; the head gives z
    got = lelp_targets(h, weight, torch.zeros(4), 2, 1, beta=0.01, backend=backend)
    # the head's projection errs by ~1e-6 on the CUDA tile (its bf16 hi + lo map); the bug, by 7e-4
    torch.testing.assert_close(got.double(), torch.log_softmax(z.double(), 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_and_tiny_beta(backend):
    h, weight, bias, _ = random_map(16, 12, 2, 4, True, seed=3, scale=1e3)
    got = lelp_targets(h.float(), (weight * 10).float(), bias.float(), 2, 4, beta=0.01, backend=backend)
    want = fp64_reference(h.float(), weight * 10, bias, None, 2, 4, 0.01, 1.0)
    assert torch.isfinite(got).all()
    # |log t| up to ~1e6; the CUDA tile splits fp32 h into bf16 hi + lo (as the Triton kernel does):
    # errors up to ~2^-16 of the largest |log t| (docs/algorithm.md)
    atol = 2.0**-16 * float(want.abs().max()) if backend == "cuda_emu" else 1.0
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    h, weight, bias, logits = random_map(40, 30, 2, 3, False, seed=4)
    wide = torch.randn(40, 60, dtype=torch.float32)
    wide[:, ::2] = h.float()
    strided = wide[:, ::2]  # every other column: rows not contiguous
    assert not strided.is_contiguous()
    rows = torch.randn(80, 30, dtype=torch.float32)
    rows[::2] = h.float()
    got_strided = lelp_targets(strided, weight.float(), bias.float(), 2, 3, teacher_logits=logits.float(), backend=backend)
    got_rows = lelp_targets(rows[::2], weight.float(), bias.float(), 2, 3, teacher_logits=logits.float().T.contiguous().T, backend=backend)
    want = fp64_reference(h.float(), weight, bias, logits.float(), 2, 3, 1.0, 1.0)
    torch.testing.assert_close(got_strided.double(), want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_rows.double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    got = lelp_targets(torch.zeros(0, 5), torch.zeros(5, 6), torch.zeros(6), 2, 2, backend=backend)
    assert got.shape == (0, 4)


def test_bad_arguments_are_named():
    h = torch.randn(4, 5)
    w, b = torch.randn(5, 6), torch.randn(6)
    with pytest.raises(ValueError, match="embeddings row 2 contains NaN"):
        bad = h.clone()
        bad[2, 0] = float("nan")
        lelp_targets(bad, w, b, 2, 2)
    with pytest.raises(ValueError, match="weight must have 6 columns"):
        lelp_targets(h, w[:, :5], b, 2, 2)
    with pytest.raises(ValueError, match="projector expects d=5"):
        lelp_targets(torch.randn(4, 7), w, b, 2, 2)
    with pytest.raises(ValueError, match="teacher_logits has 3 rows"):
        lelp_targets(h, w[:, :4], b[:4], 2, 2, teacher_logits=torch.randn(3, 2))
    with pytest.raises(ValueError, match="beta"):
        lelp_targets(h, w, b, 2, 2, beta=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        lelp_targets(h, w, b, 2, 2, backend="tpu")
    with pytest.raises(ValueError, match="out must be a"):
        lelp_targets(h, w, b, 2, 2, out=torch.empty(4, 5))


def test_forced_unavailable_backend_raises():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        lelp_targets(torch.randn(3, 5), torch.randn(5, 6), torch.randn(6), 2, 2, backend="cuda")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("LELP_FAST_BACKEND", "torch")
    assert _dispatch.resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("LELP_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="LELP_FAST_BACKEND"):
        _dispatch.resolve("auto", torch.device("cpu"))


def test_auto_prefers_compiled_cpu_backend():
    assert "cpu" in BACKENDS, "the compiled extension must be built for the CPU backend"
    assert _dispatch.resolve("auto", torch.device("cpu")) == "cpu"


def test_float64_runs_on_torch_and_is_rejected_by_forced_cpu():
    h, weight, bias, _ = random_map(5, 6, 2, 2, True, seed=5)
    got = lelp_targets(h, weight, bias, 2, 2, out_dtype=torch.float64)  # auto falls back to torch
    torch.testing.assert_close(got, fp64_reference(h, weight.double(), bias.double(), None, 2, 2, 1.0, 1.0)
                               .to(torch.float64), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="backend 'cpu' takes float32/float16/bfloat16"):
        lelp_targets(h, weight.float(), bias.float(), 2, 2, backend="cpu")


@pytest.mark.skipif(not torch.cuda.is_available() or not _dispatch.available("cuda", torch.device("cuda")),
                    reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    h, weight, bias, _ = random_map(1031, 77, 3, 5, True, seed=6)
    h_in = h.to(dtype)
    out = torch.full((1031, 15), float("nan"), device="cuda")
    got = lelp_targets(h_in.cuda(), weight.float().cuda(), bias.float().cuda(), 3, 5, backend="cuda", out=out)
    want = fp64_reference(h_in, weight, bias, None, 3, 5, 1.0, 1.0)
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled extension")
def test_portable_cpu_kernels_match_reference():
    """The non-AVX2 builds of the targets and loss kernels, forced in a fresh process (the kernel is
    chosen once per process)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch;"
        "from lelp_fast import _C; assert _C.cpu_isa() == 'portable', _C.cpu_isa();"
        "from test_ops_targets import random_map, fp64_reference;"
        "from lelp_fast.ops import lelp_targets;"
        "h, w, b, z = random_map(37, 29, 3, 5, False, seed=9);"
        "got = lelp_targets(h.bfloat16(), w.float(), b.float(), 3, 5, teacher_logits=z.float(), backend='cpu');"
        "want = fp64_reference(h.bfloat16(), w, b, z.float(), 3, 5, 1.0, 1.0);"
        "torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4);"
        "from lelp_fast.ops import distill_loss; from lelp_fast import reference;"
        "s = torch.randn(37, 15, dtype=torch.float64, requires_grad=True);"
        "loss = distill_loss(s.float(), want.float(), None, num_classes=3, n_subclasses=5, divergence='js', backend='cpu');"
        "ref = reference.distillation_loss(s, want, None, num_classes=3, n_subclasses=5, divergence_kind='js');"
        "torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=1e-4)"
    )
    env = dict(os.environ, LELP_FAST_CPU_ISA="portable")
    # Run from tests/ so that the installed package, not the source tree, is imported.
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=here, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


BF16_SHAPES = [(1, 1, 2, 1, True), (5, 7, 10, 16, True), (37, 29, 3, 5, False), (130, 768, 2, 64, True),
               (9, 33, 2, 256, False), (6, 1025, 16, 8, True)]


def _bf16_path_case(n, d, num_classes, s, with_head, seed):
    """bf16 embeddings (rows strided, as a slice of a wider buffer) vs the fp64 reference."""
    h, weight, bias, logits = random_map(n, d, num_classes, s, with_head, seed=seed, scale=4.0)
    wide = torch.zeros(n, d + 3, dtype=torch.bfloat16)
    wide[:, 1:d + 1] = h.bfloat16()
    h_in = wide[:, 1:d + 1]
    z_in = None if logits is None else logits.float()
    want = fp64_reference(h_in, weight, bias, z_in, num_classes, s, beta=0.6, tau=1.5)
    got = lelp_targets(h_in, weight.float(), bias.float(), num_classes, s, teacher_logits=z_in, beta=0.6, tau=1.5,
                       backend="cpu")
    return got, want


@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_bf16_embeddings_on_the_bf16_instructions(shape):
    """Issue 21 item 14: bf16 embeddings take vdpbf16ps on the fp32 map split into bf16 hi + lo where the
    CPU has AVX512-BF16 (targets_bf16_isa() says so); fp32-like error against the fp64 reference (a
    bf16-rounded map alone would be off by ~1e-2 at these scales). Odd d, K up to 512, strided rows."""
    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled extension")
    got, want = _bf16_path_case(*shape, seed=sum(shape))
    torch.testing.assert_close(got.double(), want, atol=ATOL[torch.bfloat16], rtol=1e-4)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_bf16_embeddings_with_the_bf16_instructions_forced_off(isa):
    """LELP_FAST_CPU_ISA=avx2/portable: the fp32 projection of bf16 embeddings, same answers."""
    import os
    import subprocess
    import sys

    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled extension")
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from test_ops_targets import BF16_SHAPES, _bf16_path_case
from lelp_fast import _C
assert _C.targets_bf16_isa() == {isa!r}, _C.targets_bf16_isa()
for shape in BF16_SHAPES:
    got, want = _bf16_path_case(*shape, seed=sum(shape))
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)
"""
    # cwd elsewhere: from the repository root, "-c" would import the source tree, which has no
    # compiled extension in CI (it is installed into the environment).
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LELP_FAST_CPU_ISA=isa),
                         capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_embeddings_and_many_outputs(backend):
    """d past 8192 and K = 512 (C = 2, S = 256), odd N."""
    h, weight, bias, _ = random_map(3, 8193, 2, 256, True, seed=13)
    got = lelp_targets(h.float(), weight.float(), bias.float(), 2, 256, backend=backend)
    want = fp64_reference(h.float(), weight, bias, None, 2, 256, 1.0, 1.0)
    torch.testing.assert_close(got.double(), want, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_are_named_and_overflowing_finite_rows_pass(dtype, bad_value):
    h = torch.randn(50, 12).to(dtype)
    h[3] = torch.finfo(dtype).max  # finite: not reported as NaN/Inf input...
    w, b = torch.randn(12, 6), torch.randn(6)
    if torch.finfo(dtype).max > 1e38:  # ...but where its projection overflows fp32, that is named
        with pytest.raises(ValueError, match="embeddings row 3 is finite but its projection"):
            lelp_targets(h, w, b, 2, 2, backend="torch")
    else:
        lelp_targets(h, w, b, 2, 2, backend="torch")
    h[41, 7] = bad_value
    h[44, 0] = bad_value
    with pytest.raises(ValueError, match="embeddings row 41 contains NaN or Inf"):
        lelp_targets(h, w, b, 2, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_teacher_logits_are_named(backend):
    h, z = torch.randn(30, 8), torch.randn(30, 2)
    w, b = torch.randn(8, 4), torch.randn(4)
    z[17, 1] = float("inf")
    with pytest.raises(ValueError, match="teacher_logits row 17 contains NaN or Inf"):
        lelp_targets(h, w, b, 2, 2, teacher_logits=z, backend=backend)
    h[9, 0] = float("nan")
    with pytest.raises(ValueError, match="embeddings row 9 contains NaN or Inf"):
        lelp_targets(h, w, b, 2, 2, teacher_logits=z, backend=backend)


@pytest.mark.parametrize("with_logits", [False, True])
def test_default_check_reads_no_values_off_a_non_cpu_device(with_logits):
    """Issue 21 items 5 and 9: on a GPU the default check read h once more and synchronised
    (torch.nonzero), ~2.1 ms at 4 M x 768. Now only CPU tensors are checked, as in distill_loss. The
    meta device stands in for a GPU: its tensors hold no values, so any read of them raises."""
    h = torch.randn(5, 8, device="meta")
    z = torch.randn(5, 2, device="meta") if with_logits else None
    w, b = torch.randn(8, 4 if with_logits else 6, device="meta"), torch.randn(4 if with_logits else 6, device="meta")
    out = lelp_targets(h, w, b, 2, 2, teacher_logits=z, backend="torch")
    assert out.shape == (5, 4) and out.device.type == "meta"


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_projection_is_an_error_not_nan_targets(backend):
    """Finite rows whose projection overflows (3e38) gave all-NaN targets with no error."""
    h, weight, bias, _ = random_map(6, 5, 2, 3, True, seed=21)
    h = h.float()
    h[4] = 3e38
    with pytest.raises(ValueError, match="row 4 .*overflows"):
        lelp_targets(h, (weight * 100).float(), bias.float(), 2, 3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias_is_a_subclass_of_target_zero_not_an_overflow(backend):
    """A −inf bias (a class with fewer subclasses than S, issue 22's per-class S) gives that subclass
    target 0 and the others the class's whole mass; the CPU kernel took it for an overflow. An
    overflowing row is still named."""
    h, weight, bias, logits = random_map(29, 7, 3, 4, False, seed=23)
    dead = [3, 6, 7, 11]  # class 0 has 3 subclasses, class 1 two, class 2 three
    weight[:, dead], bias[dead] = 0.0, -math.inf
    got = lelp_targets(h.float(), weight.float(), bias.float(), 3, 4, teacher_logits=logits.float(), beta=0.3,
                       backend=backend)
    want = fp64_reference(h.float(), weight, bias, logits.float(), 3, 4, beta=0.3, tau=1.0)
    assert torch.isneginf(got[:, dead]).all() and torch.isfinite(want[:, [0, 1, 2, 4, 5, 8, 9, 10]]).all()
    keep = [j for j in range(12) if j not in dead]
    torch.testing.assert_close(got.double()[:, keep], want[:, keep], atol=ATOL[torch.float32], rtol=0)
    h = h.float()
    h[4] = 3e38
    with pytest.raises(ValueError, match="row 4 .*overflows"):
        lelp_targets(h, (weight * 100).float(), bias.float(), 3, 4, teacher_logits=logits.float(), backend=backend)


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_out_dtype_is_refused(out_dtype):
    h, weight, bias, _ = random_map(3, 4, 2, 2, True, seed=22)
    with pytest.raises(TypeError, match="out_dtype"):
        lelp_targets(h.float(), weight.float(), bias.float(), 2, 2, out_dtype=out_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e7, 1e9])
@pytest.mark.parametrize("with_head", [True, False])
def test_one_subclass_is_exactly_vanilla_kd(backend, scale, with_head):
    """S = 1: the subclass term is exactly 0 however large |u|/beta is, so the targets are the
    backend's own class log-softmax bit for bit (issue 20: a 1-ulp slip of u/beta cost 0.125)."""
    n, d, num_classes = 37, 11, 3
    h, weight, bias, logits = random_map(n, d, num_classes, 1, with_head, seed=5)
    huge = weight.clone()
    huge[:, :num_classes] *= scale  # u columns only; the head columns keep the class logits
    kd_map = weight.clone()
    kd_map[:, :num_classes] = 0.0  # u = bias: a constant per class, subclass term 0 by any path
    z = None if logits is None else logits.float()
    got = lelp_targets(h.float(), huge.float(), bias.float(), num_classes, 1, teacher_logits=z, beta=0.05,
                       tau=1.3, backend=backend)
    kd = lelp_targets(h.float(), kd_map.float(), bias.float(), num_classes, 1, teacher_logits=z, beta=0.05,
                      tau=1.3, backend=backend)
    assert torch.equal(got, kd)
    class_logits = h.float().double() @ weight[:, num_classes:].float().double() + bias[num_classes:].float().double() \
        if logits is None else logits.float().double()
    torch.testing.assert_close(got.double(), torch.log_softmax(class_logits / 1.3, dim=1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("with_head", [True, False])
def test_torch_compile_traces_the_targets_op(with_head):
    """The compiled kernels are one custom op with a fake implementation: fullgraph tracing works
    (the launcher's data_ptr() calls and the host-side input check broke the graph before)."""
    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled extension")
    from lelp_fast.ops import targets as targets_op

    h, weight, bias, logits = random_map(33, 20, 3, 4, with_head, seed=21)
    h, w, b = h.float(), weight.float(), bias.float()
    z = None if logits is None else logits.float()

    def fn(h, z):
        return lelp_targets(h, w, b, 3, 4, teacher_logits=z, beta=0.8, tau=1.3, backend="cpu")

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(h, z)
    want = fp64_reference(h, w.double(), b.double(), z, 3, 4, beta=0.8, tau=1.3)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    torch.library.opcheck(targets_op._targets_op, (h, w, b, z, 3, 4, 0.8, 1.3, torch.float32, "cpu", "cpu", True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_vanilla_kd_targets_read_no_embeddings(backend, out_dtype):
    """S = 1 with given logits is vanilla KD, ``log_softmax(z / τ)``: the embeddings are not read, so
    rows of NaN embeddings neither raise (the default check) nor reach the targets. Before, every
    backend read h (to add a subclass term of u - u) and raised on them, or gave NaN rows unchecked."""
    g = torch.Generator().manual_seed(8)
    n, num_classes = 45, 7
    h = torch.randn(n, 24, generator=g)
    h[[0, 17]] = float("nan")
    weight, bias = torch.randn(24, num_classes, generator=g), torch.randn(num_classes, generator=g)
    z = torch.randn(n, num_classes, generator=g) * 4
    want = torch.log_softmax(z.double() / 1.3, dim=1)
    for check_inputs in (True, False):
        got = lelp_targets(h, weight, bias, num_classes, 1, teacher_logits=z, beta=0.4, tau=1.3, backend=backend,
                           out_dtype=out_dtype, check_inputs=check_inputs)
        assert got.dtype == out_dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=torch.finfo(out_dtype).eps)
    for bad in (float("nan"), float("inf"), float("-inf")):  # the logits are still checked (from the targets)
        z[5, 2], z[30, 0] = bad, bad
        with pytest.raises(ValueError, match="teacher_logits row 5 contains NaN or Inf"):
            lelp_targets(h, weight, bias, num_classes, 1, teacher_logits=z, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vanilla_kd_targets_whose_logits_overflow_at_tau_are_named(backend):
    """Finite logits whose z / τ overflows fp32 give NaN targets: with the default check on the CPU
    that is an error naming the logits' row (not the embeddings', which vanilla KD does not read);
    -inf targets of finite logits (a probability of 0) are no error."""
    z = torch.randn(20, 3)
    z[4, 1] = 3e38
    h, w, b = torch.randn(20, 5), torch.randn(5, 3), torch.randn(3)
    with pytest.raises(ValueError, match="teacher_logits row 4 is finite but its targets are not"):
        lelp_targets(h, w, b, 3, 1, teacher_logits=z, tau=0.5, backend=backend)
    z[4] = torch.tensor([-3e38, 3e38, 0.0])  # log t = -6e38 is -inf in fp32: a target of 0
    got = lelp_targets(h, w, b, 3, 1, teacher_logits=z, tau=1.0, backend=backend)
    assert torch.isneginf(got[4, 0]) and torch.isfinite(got[[i for i in range(20) if i != 4]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_vanilla_kd_targets_differentiate_on_the_torch_backend_only(backend):
    """The torch backend's vanilla KD targets are the formula, differentiable in the logits (writing
    them with an ``out=`` log-softmax broke their backward); the compiled backends' are not."""
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(9, 4, generator=g) * 2).requires_grad_(True)
    h, w, b = torch.randn(9, 3, generator=g), torch.randn(3, 4, generator=g), torch.randn(4, generator=g)
    got = lelp_targets(h, w, b, 4, 1, teacher_logits=z, tau=1.5, backend=backend)
    if backend != "torch":
        assert not got.requires_grad
        return
    (grad,) = torch.autograd.grad((got * torch.arange(4.0)).sum(), z)
    want = torch.log_softmax(z / 1.5, dim=1)
    (want_grad,) = torch.autograd.grad((want * torch.arange(4.0)).sum(), z)
    torch.testing.assert_close(grad, want_grad)


HUGE_SCALED_LOGITS = [([5e2, 5e2, 5e2 - 7e-3], 0.01), ([1.0, 1.0, 0.3], 1e-6), ([1e5, 1e5, 1e5 - 0.7], 1.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("z_row, tau", HUGE_SCALED_LOGITS)
def test_class_log_softmax_of_huge_scaled_logits_stays_normalised(backend, with_head, z_row, tau, device="cpu"):
    """The compiled kernels took log p_c = z_c/τ − (max + log Σ): at z/τ of 5e4–1e6 the log-sum was
    rounded away (at z = [1, 1, 0.3], τ = 1e-6: log p = −0.6875 for −0.6931), so the class
    probabilities summed to 1 ± 2e-3 and a log-target passed 0. Now the logits are shifted by their
    max before scaling and the log-sum subtracted from the shifted value."""
    h, weight, bias, _ = random_map(4, 6, 3, 2, with_head, seed=31)
    z = torch.tensor([z_row] * 4, dtype=torch.float64)
    if with_head:  # the head's logits are its bias: the embeddings' columns of the head are zero
        weight[:, 6:], bias[6:] = 0.0, z[0]
    logits = None if with_head else z.float()
    got = lelp_targets(*_on(device, h.float(), weight.float(), bias.float()), 3, 2,
                       teacher_logits=_on(device, logits)[0], beta=0.7, tau=tau, backend=backend).cpu().double()
    want = fp64_reference(h.float(), weight, bias, logits, 3, 2, beta=0.7, tau=tau)
    assert got.max() <= 0.0
    torch.testing.assert_close(got.exp().sum(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
    # the fp32 logits hold z / τ to an ulp (5e4: 4e-3): only the shift that reaches log p is compared
    class_got = torch.logsumexp(got.reshape(4, 3, 2), dim=2)
    class_want = torch.logsumexp(want.reshape(4, 3, 2), dim=2)
    ulp = (z.float()[0].abs().max() / tau) * 2.0**-23
    torch.testing.assert_close(class_got, class_want, atol=float(ulp) * 4 + 1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_scaled_logits_of_many_classes_stay_normalised(backend, device="cpu"):
    """40 given logits at τ = 1e-6, their max in the second of the Triton kernel's 32-class chunks
    (its log-partition rescales online from chunk to chunk): the class probabilities sum to 1 and
    are the fp64 reference's. Before the shift, the Triton kernel's summed to 1.0199 (found in review,
    2026-12-06)."""
    c = 40
    h, weight, bias, _ = random_map(4, 16, c, 2, False, seed=9)
    z = torch.full((4, c), -5.0)
    z[:, 35], z[:, 36], z[:, 3], z[:, 38] = 1.0, 1.0, 1.0 - 7e-7, 0.3
    got = lelp_targets(*_on(device, h.float(), weight.float(), bias.float()), c, 2, teacher_logits=_on(device, z)[0],
                       beta=0.9, tau=1e-6, backend=backend).cpu().double()
    want = fp64_reference(h.float(), weight, bias, z, c, 2, beta=0.9, tau=1e-6)
    torch.testing.assert_close(got.exp().sum(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
    class_got = torch.logsumexp(got.reshape(4, c, 2), dim=2)
    class_want = torch.logsumexp(want.reshape(4, c, 2), dim=2)
    finite = torch.isfinite(class_want)
    assert torch.equal(torch.isfinite(class_got), finite)
    # z holds 1 - 7e-7 to an ulp (6e-8), 0.06 once divided by τ; a class at -6e6 is held to fp32's ulps
    torch.testing.assert_close(class_got[finite], class_want[finite], atol=0.1, rtol=2.4e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_head", [True, False])
def test_subclass_log_softmax_at_tiny_beta_stays_normalised(backend, with_head, device="cpu"):
    """The subclass log-softmax at u / β of about 1e6 (β = 1e-6). The torch backend divided by β
    before its log-softmax's shift: u / β rounded to 0.06, its targets were 0.019 off the fp64
    reference's (until 2026-12-06). It now shifts u by its class's unscaled max, then scales, as the
    C++ kernels do (row_math.h)."""
    h, weight, bias, logits = random_map(4, 6, 3, 2, with_head, seed=34)
    weight[:, :6] = 0.0  # the subclass projections are the biases: u = [1, 1 - 7e-7] in every class
    bias[:6] = torch.tensor([1.0, 1.0 - 7e-7] * 3, dtype=torch.float32).double()
    got = lelp_targets(*_on(device, h.float(), weight.float(), bias.float()), 3, 2,
                       teacher_logits=_on(device, None if logits is None else logits.float())[0], beta=1e-6,
                       tau=1.3, backend=backend).cpu().double()
    want = fp64_reference(h.float(), weight, bias, None if logits is None else logits.float(), 3, 2, beta=1e-6,
                          tau=1.3)
    torch.testing.assert_close(got.exp().sum(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_logits_whose_scaled_value_overflows_give_targets(backend, device="cpu"):
    """z = [3e38, 1, 0] at τ = 0.5: z / τ overflows float32, but the class log-softmax does not (it is
    [0, −inf, −inf] in fp32). The CPU kernel gave NaN targets with no error, the torch backend an
    error; the online CPU loss on them was NaN."""
    h, weight, bias, _ = random_map(3, 5, 3, 2, False, seed=32)
    z = torch.randn(3, 3)
    z[1] = torch.tensor([3e38, 1.0, 0.0])
    got = lelp_targets(*_on(device, h.float(), weight.float(), bias.float()), 3, 2, teacher_logits=_on(device, z)[0],
                       beta=0.9, tau=0.5, backend=backend).cpu().double()
    want = fp64_reference(h.float(), weight, bias, z, 3, 2, beta=0.9, tau=0.5)  # finite in fp64
    assert not torch.isnan(got).any()
    assert torch.isneginf(got[1, 2:]).all() and torch.isfinite(got[1, :2]).all()
    torch.testing.assert_close(got[1, :2], want[1, :2], atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=ATOL[torch.float32], rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("s", [2, 1])
@pytest.mark.parametrize("tau", [1e38, 1e46])
def test_a_tau_whose_inverse_is_no_normal_float_gives_uniform_classes(backend, with_head, s, tau, device="cpu"):
    """τ of 1e38 (1/τ subnormal in fp32, which a GPU's FTZ arithmetic takes as 0) and 1e46 (1/τ rounds
    to 0); the public API takes any finite τ > 0. The classes come out equally likely, the reference's
    limit. The Triton targets kernel multiplied its padded head columns and padded logits (-inf) by a
    1/τ of 0: NaN targets, which the input check then blamed on the embeddings (found in review,
    2026-12-06)."""
    h, weight, bias, logits = random_map(5, 6, 3, s, with_head, seed=35)
    logits = None if logits is None else logits.float()
    got = lelp_targets(*_on(device, h.float(), weight.float(), bias.float()), 3, s,
                       teacher_logits=_on(device, logits)[0], beta=0.8, tau=tau, backend=backend).cpu().double()
    want = fp64_reference(h.float(), weight, bias, logits, 3, s, beta=0.8, tau=tau)
    torch.testing.assert_close(got, want, atol=ATOL[torch.float32], rtol=1e-4)


def _on(device, *tensors):
    """The tensors on ``device`` (None stays None), for a backend whose tensors live on a GPU."""
    return [None if t is None else t.to(device) for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_names_the_overflowing_row_not_a_row_whose_sum_overflows(backend):
    """The CPU kernel flags a row by the sum of its projections and logits, which finite values can
    overflow (z = [2e38] * 3): that row was refused as an overflow ("embeddings row 1"), although
    its targets are finite, and with a real overflow below it the error named row 1, not it."""
    h, weight, bias, _ = random_map(5, 6, 3, 2, False, seed=33)
    h, weight, bias = h.float(), weight.float(), bias.float()
    z = torch.randn(5, 3)
    z[1] = 2e38
    got = lelp_targets(h, weight, bias, 3, 2, teacher_logits=z, backend=backend)
    torch.testing.assert_close(got[1].double().exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    h[3] = 3e38
    with pytest.raises(ValueError, match="embeddings row 3 is finite but its projection"):
        lelp_targets(h, weight * 100, bias, 3, 2, teacher_logits=z, backend=backend)
