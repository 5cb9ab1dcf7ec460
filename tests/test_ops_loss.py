"""The fused loss (forward + backward) on every available backend against the fp64 reference."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lelp_fast import reference
from lelp_fast.ops import _dispatch, distill_loss
from lelp_fast.ops import loss as loss_ops

BACKENDS = ["torch"] + (["cpu", "cuda_emu"] if _dispatch.available("cpu", torch.device("cpu")) else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Per input dtype: the inputs are rounded once, all math is fp32.
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


def make_inputs(n, num_classes, s, seed, scale=3.0, m=None):
    g = torch.Generator().manual_seed(seed)
    k = num_classes * s
    student = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    shape = (n, k) if m is None else (n, m, k)
    log_t = torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, dim=-1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return student, log_t, labels


def reference_loss_and_grad(student, log_t, labels, **kw):
    s = student.detach().double().requires_grad_(True)
    loss = reference.distillation_loss(s, log_t.double(), labels, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s) if loss.ndim else torch.autograd.grad(loss, s)
    return loss.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
@pytest.mark.parametrize("shape", [(1, 2, 1), (37, 2, 8), (130, 5, 8), (9, 3, 13), (4, 2, 256)])
def test_loss_forward_backward_match_reference(backend, dtype, divergence, shape):
    n, num_classes, s = shape
    student, log_t, labels = make_inputs(n, num_classes, s, seed=n * s + num_classes)
    labels[0] = -100 if n > 1 else labels[0]
    student_in = student.to(dtype).requires_grad_(True)
    log_t_in = log_t.to(dtype)
    kw = dict(num_classes=num_classes, n_subclasses=s, tau=1.7, alpha=0.3)
    loss = distill_loss(student_in, log_t_in, labels, divergence=divergence, backend=backend, **kw)
    grad_out = torch.tensor(0.37)
    (grad,) = torch.autograd.grad(loss, student_in, grad_out)
    want_loss, want_grad = reference_loss_and_grad(student_in, log_t_in, labels, divergence_kind=divergence, **kw)
    atol, rtol = TOL[dtype]
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.double(), 0.37 * want_grad, atol=atol * 2, rtol=rtol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("shape", [(70, 2, 64), (9, 2, 256), (33, 16, 8), (21, 5, 8), (83, 3, 5)])
def test_kl_alpha_paths_match_reference(backend, dtype, tau, shape):
    """Issue 21 item 12: the KL kernel reuses its softmax exponentials for the alpha term at tau = 1
    and 2 (another exp otherwise), with block sizes by K; rows whose labelled class underflows
    against the row max (gap > 88 / 176) take the per-row path. K = 15: the CPU kernel's lane layout
    (16 rows across the vector lanes; more than one block of rows)."""
    n, num_classes, s = shape
    student, log_t, labels = make_inputs(n, num_classes, s, seed=n + s)
    student[1, labels[1] * s:(labels[1] + 1) * s] -= 400.0
    student[2, labels[2] * s:(labels[2] + 1) * s] -= 100.0
    log_t[3, :3] = float("-inf")
    log_t[3] = torch.log_softmax(log_t[3], 0)
    labels[4] = -100
    x = student.to(dtype).requires_grad_(True)
    kw = dict(num_classes=num_classes, n_subclasses=s, tau=tau, alpha=0.3)
    loss = distill_loss(x, log_t.to(dtype), labels, backend=backend, reduction="none", **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    want, want_grad = reference_loss_and_grad(x, log_t.to(dtype), labels, divergence_kind="kl", reduction="none",
                                              **kw)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss.double(), want, atol=atol * 4, rtol=rtol)
    torch.testing.assert_close(grad.double(), want_grad, atol=atol * 2, rtol=rtol * 10)


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_loss_forced_down_to_each_instruction_set(isa):
    """LELP_FAST_CPU_ISA caps the CPU loss kernel (the AVX-512 build is the default where the CPU has it);
    K = 10 KL rows run the lane layout in each build."""
    import os
    import subprocess
    import sys

    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled extension")
    code = f"""
import torch
from lelp_fast import reference
from lelp_fast.ops import _dispatch, distill_loss
assert _dispatch.extension().loss_isa() == {isa!r}, _dispatch.extension().loss_isa()
g = torch.Generator().manual_seed(3)
s = torch.randn(45, 128, generator=g, dtype=torch.float64) * 3
y = torch.randint(0, 2, (45,), generator=g)
t = torch.log_softmax(torch.randn(45, 128, generator=g, dtype=torch.float64) * 3, -1)
cases = [(div, s, t, 2, 64) for div in ("kl", "js", "tvd")]
cases.append(("kl", s[:, :10].clone(), torch.log_softmax(t[:, :10], -1), 5, 2))  # K = 10: the lane layout
for div, s_in, t_in, c, sub in cases:
    for tau in (1.0, 2.0, 1.3):
        kw = dict(num_classes=c, n_subclasses=sub, tau=tau, alpha=0.2)
        x, xr = s_in.float().requires_grad_(True), s_in.clone().requires_grad_(True)
        got = distill_loss(x, t_in.float(), y, divergence=div, backend="cpu", **kw)
        got.backward()
        ref = reference.distillation_loss(xr, t_in, y, divergence_kind=div, **kw)
        ref.backward()
        torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-3)
"""
    env = dict(os.environ, LELP_FAST_CPU_ISA=isa)
    # cwd elsewhere: from the repository root, "-c" would import the source tree, which has no
    # compiled extension in CI (it is installed into the environment).
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_reductions_and_grad_output(backend, reduction):
    student, log_t, labels = make_inputs(23, 2, 4, seed=1)
    labels[[3, 9]] = -100
    x = student.float().requires_grad_(True)
    loss = distill_loss(x, log_t.float(), labels, num_classes=2, n_subclasses=4, reduction=reduction,
                        alpha=0.5, backend=backend)
    g_out = torch.linspace(-1, 2, 23) if reduction == "none" else torch.tensor(1.9)
    (grad,) = torch.autograd.grad(loss, x, g_out)
    s = student.clone().requires_grad_(True)
    want = reference.distillation_loss(s, log_t, labels, num_classes=2, n_subclasses=4, reduction=reduction,
                                       alpha=0.5)
    (want_grad,) = torch.autograd.grad(want, s, g_out.double())
    torch.testing.assert_close(loss.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    student, log_t, _ = make_inputs(6, 2, 3, seed=2)
    labels = torch.full((6,), -100)
    x = student.float().requires_grad_(True)
    loss = distill_loss(x, log_t.float(), labels, num_classes=2, n_subclasses=3, alpha=1.0, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
def test_huge_logits_and_tiny_beta(backend, divergence):
    """Logits of ±1e4 and targets from β = 0.01: finite loss and gradient, equal to the reference."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(8, 2 * 4, generator=g, dtype=torch.float64) * 50
    z = torch.randn(8, 2, generator=g, dtype=torch.float64) * 1e4
    log_t = reference.log_targets(u, z, 4, beta=0.01)
    student = torch.randn(8, 8, generator=g, dtype=torch.float64) * 1e4
    x = student.float().requires_grad_(True)
    loss = distill_loss(x, log_t.float(), None, num_classes=2, n_subclasses=4, divergence=divergence,
                        backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    want, want_grad = reference_loss_and_grad(x, log_t.float(), None, num_classes=2, n_subclasses=4,
                                              divergence_kind=divergence)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-4, atol=1e-3)


# (row, a value its logits take 1 % apart or None, (column, value) or None, tau): student logits whose
# value times log2(e)/tau (or over tau), or whose gap to the row's max, overflows fp32, while the loss
# does not
NEAR_FLOAT_MAX = {
    "top logit at tau 1": (3, None, (5, 3.0e38), 1.0),
    "row near +max at tau 0.5": (0, 1.8e38, None, 0.5),
    "row near -max at tau 1": (5, -3.0e38, None, 1.0),
    "row near -1e38 and one at -1.75e38 at tau 0.5": (2, -1.0e38, (3, -1.75e38), 0.5),
    "row spanning past FLT_MAX at tau 2": (4, 3.0e38, (2, -1.0e38), 2.0),
    # at tau > 1 (scaled first) x / tau - m / tau was contracted to fma(x, 1/tau, -(m / tau)) in the CPU
    # kernel: for the max, m / tau's rounding error, not 0 (-142 at 1e10 / 1.5): q summed to 0, the loss
    # -inf or NaN (a session-66 audit)
    "top logit 1e10 at tau 1.5": (1, None, (2, 1.0e10), 1.5),
    "top logit 5e9 at tau 1.1": (6, None, (0, 5.0e9), 1.1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(NEAR_FLOAT_MAX))
@pytest.mark.parametrize("terms", ["kl", "kl alpha", "kl lambda", "kl lambda alpha", "reverse_kl", "jsd"])
def test_student_logits_near_the_float_max_give_the_references_loss(backend, case, terms, device="cpu"):
    """A student logit s with s log2(e)/tau past FLT_MAX (finite in fp32, and passed by the input
    check): at tau < 1 each log-softmax shifts by its unscaled max before scaling (scaled_gap), so the
    loss and gradient are the fp64 reference's, per row, not NaN or inf; at tau >= 1 it scales first,
    so that a row spanning more than FLT_MAX keeps its finite loss. (The Triton loss, not changed,
    takes s log2(e)/tau first: NaN at s = 2.4e38, tau = 1.)"""
    row, spread, one, tau = NEAR_FLOAT_MAX[case]
    c, s = 2, 4
    student, log_t, labels = make_inputs(7, c, s, seed=71)
    if spread is not None:
        student[row] = spread * (1.0 + 0.01 * torch.rand(c * s, generator=torch.Generator().manual_seed(5)))
    if one is not None:
        student[row, one[0]] = one[1]
    x = student.float().to(device).requires_grad_(True)
    lt = log_t.float().to(device)
    divergence = terms.split()[0]
    alpha = 0.3 if "alpha" in terms else 0.0
    lam = 0.1 if "lambda" in terms else 1.0
    per_row = distill_loss(x, lt, labels.to(device), num_classes=c, n_subclasses=s, tau=tau, alpha=alpha,
                           divergence=divergence, subclass_weight=lam, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(per_row.sum(), x)
    ref = x.detach().cpu().double().requires_grad_(True)
    if lam == 1.0:
        soft = reference.distillation_loss(ref, lt.cpu().double(), None, num_classes=c, n_subclasses=s, tau=tau,
                                           divergence_kind=divergence, reduction="none")
    else:
        soft = reference.subclass_weighted_kl(ref, lt.cpu().double(), c, s, tau, lam)
    want = soft + alpha * reference.hard_label_rows(ref, labels, c, s)
    (want_grad,) = torch.autograd.grad(want.sum(), ref)
    assert torch.isfinite(per_row).all() and torch.isfinite(grad).all(), (per_row, grad)
    torch.testing.assert_close(per_row.cpu().double(), want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gap", [1e4, 1e6, 1e8])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_subclass_weight_keeps_the_split_of_a_class_far_below(backend, gap, tau, device="cpu"):
    """λ ≠ 1 with one class ``gap`` below the row's max: its q underflows, but its split ρ_c weighs
    (1 - λ) p_c in the gradient. Summed from the class's own max it is the fp64 reference's; the
    CPU and CUDA kernels took it from (s - max)/τ, which keeps ulp(gap) of the differences within the
    class: at gap 1e6 the gradient was 8.9e-4 off, at 1e8 0.064."""
    c, s = 2, 4
    student, log_t, labels = make_inputs(9, c, s, seed=19)
    student[2, 5] = gap  # class 1 holds the max, class 0 is ~gap below it
    student[6, 1] = gap  # and the other way round
    x = student.float().to(device).requires_grad_(True)
    lt = log_t.float().to(device)
    per_row = distill_loss(x, lt, None, num_classes=c, n_subclasses=s, tau=tau, subclass_weight=0.1,
                           reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(per_row.sum(), x)
    ref = x.detach().cpu().double().requires_grad_(True)
    want = reference.subclass_weighted_kl(ref, lt.cpu().double(), c, s, tau, 0.1)
    (want_grad,) = torch.autograd.grad(want.sum(), ref)
    torch.testing.assert_close(per_row.cpu().double(), want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_subclass_weight_with_a_class_of_minus_inf_logits(backend, tau):
    """λ ≠ 1, the input check off, one row's class 0 all -inf with no target mass there: a finite
    loss and a gradient of 0 in that class on every backend (the CPU kernel and the torch backend
    gave NaN there, the CUDA kernel 0)."""
    c, s = 2, 4
    student, log_t, _ = make_inputs(5, c, s, seed=23)
    student[1, :s] = -float("inf")
    log_t[1, :s] = -float("inf")
    log_t[1] = torch.log_softmax(log_t[1], 0)
    x = student.float().requires_grad_(True)
    per_row = distill_loss(x, log_t.float(), None, num_classes=c, n_subclasses=s, tau=tau, subclass_weight=0.1,
                           reduction="none", check_inputs=False, backend=backend)
    (grad,) = torch.autograd.grad(per_row.sum(), x)
    assert torch.isfinite(per_row).all() and torch.isfinite(grad).all(), (per_row, grad)
    assert torch.equal(grad[1, :s], torch.zeros(s))
    want = reference.subclass_weighted_kl(student[[0, 2, 3, 4]], log_t[[0, 2, 3, 4]], c, s, tau, 0.1)
    torch.testing.assert_close(per_row[[0, 2, 3, 4]].double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_label_term_when_the_true_class_is_far_below_the_max(backend):
    """α CE with the labelled class 1e3..1e4 below the top logit (its softmax underflows in fp32)
    next to ordinary rows: finite, equal to the fp64 reference."""
    g = torch.Generator().manual_seed(13)
    student, log_t, labels = make_inputs(70, 3, 4, seed=13)
    far = torch.arange(0, 70, 3)
    student[far] = torch.randn(len(far), 12, generator=g, dtype=torch.float64)
    student[far, (labels[far] * 4 + 4) % 12] += torch.linspace(1e3, 1e4, len(far), dtype=torch.float64)
    x = student.float().requires_grad_(True)
    loss = distill_loss(x, log_t.float(), labels, num_classes=3, n_subclasses=4, alpha=0.7, backend=backend)
    loss.backward()
    want, want_grad = reference_loss_and_grad(x, log_t.float(), labels, num_classes=3, n_subclasses=4, alpha=0.7)
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_teacher_mixing(backend, dtype):
    student, log_t, labels = make_inputs(31, 3, 5, seed=4, m=3)
    g = torch.Generator().manual_seed(5)
    w = torch.rand(31, 3, generator=g, dtype=torch.float64)
    w[0] = torch.tensor([1.0, 0.0, 0.0])  # a zero weight is skipped, not log(0)
    w = w / w.sum(1, keepdim=True)
    x = student.to(dtype).requires_grad_(True)
    loss = distill_loss(x, log_t.to(dtype), labels, num_classes=3, n_subclasses=5, teacher_weights=w.float(),
                        divergence="js", backend=backend)
    loss.backward()
    mixed = torch.log((w.unsqueeze(-1) * log_t.to(dtype).double().exp()).sum(1))  # t = Σ w_m t_m
    want, want_grad = reference_loss_and_grad(x, mixed, labels, num_classes=3, n_subclasses=5, divergence_kind="js")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss.double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.double(), want_grad, atol=atol * 2, rtol=rtol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_logits", [False, True])
def test_online_targets_inside_the_kernel(backend, with_logits):
    g = torch.Generator().manual_seed(6)
    n, d, num_classes, s = 45, 33, 2, 6
    k = num_classes * s
    emb = torch.randn(n, d, generator=g)
    j = k if with_logits else k + num_classes
    weight = torch.randn(d, j, generator=g) / d**0.5
    bias = torch.randn(j, generator=g)
    z = torch.randn(n, num_classes, generator=g) * 2 if with_logits else None
    student = torch.randn(n, k, generator=g, requires_grad=True)
    loss = distill_loss(student, None, None, num_classes=num_classes, n_subclasses=s, embeddings=emb.bfloat16(),
                        fused_weight=weight, fused_bias=bias, teacher_logits=z, beta=0.5, tau=2.0, backend=backend)
    loss.backward()
    proj = emb.bfloat16().double() @ weight.double() + bias.double()
    log_t = reference.log_targets(proj[:, :k], proj[:, k:] if z is None else z.double(), s, beta=0.5, tau=2.0)
    want, want_grad = reference_loss_and_grad(student, log_t, None, num_classes=num_classes, n_subclasses=s, tau=2.0)
    torch.testing.assert_close(loss.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(student.grad.double(), want_grad, atol=2e-5, rtol=1e-4)


def make_online_teachers(n, dims, num_classes, s, seed):
    """Per teacher: embeddings (N, d_m), a fused map, teacher logits (None for the first: from its head)."""
    g = torch.Generator().manual_seed(seed)
    k = num_classes * s
    teachers = []
    for i, d in enumerate(dims):
        j = k + num_classes if i == 0 else k
        emb = torch.randn(n, d, generator=g)
        z = None if i == 0 else torch.randn(n, num_classes, generator=g) * 2
        teachers.append((emb, torch.randn(d, j, generator=g) / d**0.5, torch.randn(j, generator=g), z))
    return teachers


def reference_online_mix(teachers, weights, k, s, betas, tau):
    per = []
    for (emb, w, b, z), beta in zip(teachers, betas):
        proj = emb.double() @ w.double() + b.double()
        per.append(reference.log_targets(proj[:, :k], proj[:, k:] if z is None else z.double(), s, beta=beta, tau=tau))
    return torch.log((weights.double().unsqueeze(-1) * torch.stack(per, 1).exp()).sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 67])
def test_online_multi_teacher_mixed_inside_the_kernel(backend, dtype, n):
    num_classes, s = 3, 5
    teachers = make_online_teachers(n, [19, 40, 7], num_classes, s, seed=n)
    teachers = [(e.to(dtype), w, b, None if z is None else z.to(dtype)) for e, w, b, z in teachers]
    g = torch.Generator().manual_seed(n + 1)
    weights = torch.softmax(torch.randn(n, 3, generator=g), 1)
    weights[0] = torch.tensor([0.0, 1.0, 0.0])  # a zero weight: that teacher is skipped, not log(0) * ...
    _, _, labels = make_inputs(n, num_classes, s, seed=n)
    student = torch.randn(n, num_classes * s, generator=g) * 3
    x = student.to(dtype).requires_grad_(True)
    betas = [0.5, 1.0, 0.05]
    loss = distill_loss(x, None, labels, num_classes=num_classes, n_subclasses=s, tau=1.5, alpha=0.2,
                        divergence="reverse_kl", embeddings=[t[0] for t in teachers],
                        fused_weight=[t[1] for t in teachers], fused_bias=[t[2] for t in teachers],
                        teacher_logits=[t[3] for t in teachers], beta=betas, teacher_weights=weights,
                        backend=backend)
    loss.backward()
    log_t = reference_online_mix(teachers, weights, num_classes * s, s, betas, tau=1.5)
    want, want_grad = reference_loss_and_grad(x, log_t, labels, num_classes=num_classes, n_subclasses=s, tau=1.5,
                                              alpha=0.2, divergence_kind="reverse_kl")
    atol, rtol = TOL[torch.float32]  # inputs are rounded once; the reference sees the same rounded values
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), want, atol=atol * 5, rtol=rtol * 5)
    torch.testing.assert_close(x.grad.double(), want_grad.to(dtype).double(), atol=TOL[dtype][0] * 2,
                               rtol=TOL[dtype][1] * 10)


@pytest.mark.parametrize("backend", ["cuda_emu"])
def test_more_online_teachers_than_the_cuda_kernel_takes(backend, monkeypatch):
    """The CUDA loss takes at most 8 online teachers and threw past them, also under auto (Triton
    absent, or its launch failed for resources): auto now skips it, and forcing it names the limit."""
    n, num_classes, s, m = 7, 2, 3, 9
    teachers = make_online_teachers(n, [5] * m, num_classes, s, seed=9)
    weights = torch.softmax(torch.randn(n, m, generator=torch.Generator().manual_seed(9)), 1)
    x = torch.randn(n, num_classes * s, generator=torch.Generator().manual_seed(10)).requires_grad_(True)
    kw = dict(num_classes=num_classes, n_subclasses=s, tau=1.5, embeddings=[t[0] for t in teachers],
              fused_weight=[t[1] for t in teachers], fused_bias=[t[2] for t in teachers],
              teacher_logits=[t[3] for t in teachers], teacher_weights=weights)
    with pytest.raises(ValueError, match="cannot run this call: it takes at most 8 online teachers"):
        distill_loss(x, None, backend=backend, **kw)
    monkeypatch.setattr(_dispatch, "auto_candidates", lambda device: ("cuda",))  # a GPU without Triton
    loss = distill_loss(x, None, backend="auto", **kw)
    loss.backward()
    log_t = reference_online_mix(teachers, weights, num_classes * s, s, [1.0] * m, tau=1.5)
    want, want_grad = reference_loss_and_grad(x, log_t, None, num_classes=num_classes, n_subclasses=s, tau=1.5)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad.double(), want_grad, atol=1e-6, rtol=1e-4)


def test_online_multi_teacher_bad_arguments():
    n, num_classes, s = 6, 2, 3
    (e1, w1, b1, _), (e2, w2, b2, z2) = make_online_teachers(n, [5, 8], num_classes, s, seed=3)
    x = torch.randn(n, num_classes * s)
    kw = dict(num_classes=num_classes, n_subclasses=s)
    weights = torch.full((n, 2), 0.5)
    with pytest.raises(ValueError, match=r"teacher_weights must have shape \(6, 2\)"):
        distill_loss(x, embeddings=[e1, e2], fused_weight=[w1, w2], fused_bias=[b1, b2], teacher_logits=[None, z2],
                     **kw)
    with pytest.raises(ValueError, match="fused_bias must have one entry per teacher"):
        distill_loss(x, embeddings=[e1, e2], fused_weight=[w1, w2], fused_bias=[b1], teacher_logits=[None, z2],
                     teacher_weights=weights, **kw)
    with pytest.raises(ValueError, match=r"fused_weight\[1\]/fused_bias\[1\] must have shapes \(8, 8\)"):
        distill_loss(x, embeddings=[e1, e2], fused_weight=[w1, w2], fused_bias=[b1, b2], teacher_logits=[None, None],
                     teacher_weights=weights, **kw)
    with pytest.raises(ValueError, match=r"beta\[0\] must be > 0"):
        distill_loss(x, embeddings=[e1, e2], fused_weight=[w1, w2], fused_bias=[b1, b2], teacher_logits=[None, z2],
                     teacher_weights=weights, beta=[0.0, 1.0], **kw)


class _OpsOnShape(TorchDispatchMode):
    """The aten/custom ops that run on a tensor of ``shape`` while the mode is active."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ops = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, torch.Tensor) and tuple(a.shape) == self.shape for a in tree_leaves((args, kwargs))):
            self.ops.append(str(func))
        return func(*args, **kwargs)


class _OpCalls(TorchDispatchMode):
    """The outputs of every call of ``op`` while the mode is active (``count`` of them)."""

    def __init__(self, op):
        super().__init__()
        self.op, self.outputs = op, []

    @property
    def count(self) -> int:
        return len(self.outputs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is self.op:
            self.outputs.append(out)
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_without_labels_makes_no_tensor_from_host_values(backend):
    """The default reduction without labels divided by ``torch.tensor(n, device=...)``: on a GPU a
    copy and a stream synchronisation every call, and not capturable in a CUDA graph (issue 21 item 5)."""
    student, log_t, _ = make_inputs(9, 2, 3, seed=4)
    x = student.float().requires_grad_(True)
    with _OpCalls(torch.ops.aten.lift_fresh.default) as made:  # torch.tensor: a tensor from host values
        loss = distill_loss(x, log_t.float(), num_classes=2, n_subclasses=3, tau=2.0, backend=backend,
                            check_inputs=False)
        loss.backward()
    assert made.count == 0
    want, want_grad = reference_loss_and_grad(student, log_t, None, num_classes=2, n_subclasses=3, tau=2.0)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), want_grad, atol=1e-6, rtol=1e-4)


class _OpNames(TorchDispatchMode):
    """The names of the ops that run while the mode is active, views and detaches left out (they launch
    nothing on a GPU)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.__name__.startswith("detach")):
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction, labelled, want", [
    ("mean", True, ["ne.Scalar", "sum.default", "clamp_.default", "_to_copy.default", "reciprocal.default",
                    "loss_rows.default", "sum.default", "div.Tensor"]),
    ("mean", "all ignored", ["ne.Scalar", "sum.default", "clamp_.default", "_to_copy.default",
                             "reciprocal.default", "loss_rows.default", "sum.default", "div.Tensor"]),
    ("mean", False, ["full.default", "loss_rows.default", "sum.default", "div.Tensor"]),
    ("sum", True, ["full.default", "loss_rows.default", "sum.default"]),
])
def test_a_folded_loss_step_takes_the_reduction_once(monkeypatch, reduction, labelled, want):
    """The forward of a loss whose kernel folds the reduction into the gradient, as a GPU runs it (no CPU
    input check): the labels are counted once, for the kernel's scale and the loss alike, and the loss is
    no copy, yet bitwise the per-row losses reduced by ``reference.reduce_rows``. Each op is a kernel
    launch and about 5-10 us of host time on a GPU (issue 21: the small-K loss is host-bound on the
    H200). Before 2026-12-05 the mean over labels took 13 ops: the count twice (``_reduction_scale`` and
    ``reference.reduce_rows``), with casts, and a clone of the loss."""
    if "cpu" not in BACKENDS or not loss_ops._extension_folds():
        pytest.skip("needs the compiled CPU kernel that folds the reduction")
    monkeypatch.setattr(loss_ops, "_check_cpu_inputs", lambda *args, **kwargs: None)
    student, log_t, labels = make_inputs(33, 2, 4, seed=7)
    x, t = student.float().requires_grad_(True), log_t.float()
    labels = {True: labels, False: None, "all ignored": torch.full_like(labels, -100)}[labelled]
    kw = dict(num_classes=2, n_subclasses=4, tau=2.0, backend="cpu", check_inputs=False)
    with _OpNames() as ops:
        loss = distill_loss(x, t, labels, reduction=reduction, **kw)
    assert ops.names == want
    rows = distill_loss(x.detach(), t, labels, reduction="none", **kw)
    assert torch.equal(loss.detach(), reference.reduce_rows(rows, labels, -100, reduction))
    loss.backward()
    want_loss, want_grad = reference_loss_and_grad(student, log_t, labels, num_classes=2, n_subclasses=4, tau=2.0,
                                                   reduction=reduction)
    torch.testing.assert_close(loss.double(), want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), want_grad, atol=1e-6, rtol=1e-4)


GRAD_ARG = 19  # the position of the gradient's address in the extension's loss, as ops/loss.py passes it


class _GradientAddresses:
    """The ``grad`` address each compiled loss call is given (0: forward only), around the extension in use."""

    def __init__(self, real):
        self._real, self.addresses = real, []

    def loss(self, *args, **kwargs):
        self.addresses.append(args[GRAD_ARG])
        return self._real.loss(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


FORWARD_ONLY_CASES = {
    "kl-alpha-mean": dict(alpha=0.3, tau=2.0),
    "js-rows": dict(divergence="js", reduction="none"),
    "kl-lambda": dict(subclass_weight=0.1, alpha=0.2, reduction="sum"),
    "mixed-teachers": dict(teachers=2, tau=1.5),
    "online-teacher": dict(online=True, alpha=0.1),
    "kl-padded-rows": dict(shape=(3, 13), alpha=0.1),  # K = 39: the CPU kernel's rows padded to 40
}


def _forward_only_call(case, dtype, backend, requires_grad=True, device="cpu"):
    """(loss, x) of one FORWARD_ONLY_CASES call, at C = 3, S = 4 unless it says (online: a 6-d teacher)."""
    kw = dict(FORWARD_ONLY_CASES[case])
    teachers, online, (c, s) = kw.pop("teachers", None), kw.pop("online", False), kw.pop("shape", (3, 4))
    student, log_t, labels = make_inputs(41, c, s, seed=9, m=teachers)
    labels[2] = -100
    x, labels = student.to(dtype).to(device).requires_grad_(requires_grad), labels.to(device)
    if teachers:
        kw["teacher_weights"] = torch.softmax(torch.randn(41, teachers, generator=torch.Generator().manual_seed(3)), 1)
    if online:
        g = torch.Generator().manual_seed(4)
        kw.update(embeddings=torch.randn(41, 6, generator=g), fused_weight=torch.randn(6, c * s + c, generator=g),
                  fused_bias=torch.randn(c * s + c, generator=g))
        log_t = None
    else:
        log_t = log_t.to(dtype)
    kw = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in kw.items()}
    return distill_loss(x, log_t if log_t is None else log_t.to(device), labels, num_classes=c, n_subclasses=s,
                        backend=backend, **kw), x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(FORWARD_ONLY_CASES))
def test_loss_without_a_gradient_wanted_runs_forward_only(monkeypatch, backend, dtype, case):
    """Under ``torch.no_grad()`` (an evaluation loop), or for logits that need no gradient, the
    compiled kernels wrote the N x K gradient all the same: on a GPU half again the bytes of the
    forward pass (issue 21 item 3, "when a gradient is needed"). Now they are given no gradient
    address and the op returns none; the loss is the one the training call computes. The CUDA kernel
    (emulated) is given scratch: a branch around its stores cost every path 1-2 SASS instructions per
    element (ops/loss.py)."""
    kernel = _GradientAddresses(_dispatch.extension())
    if backend != "torch":
        monkeypatch.setattr(_dispatch, "extension", lambda: kernel)
    want, _ = _forward_only_call(case, dtype, backend)
    calls_with_grad = len(kernel.addresses)
    with torch.no_grad(), _OpCalls(torch.ops.lelp_fast.loss_rows.default) as calls:
        got, _ = _forward_only_call(case, dtype, backend)
    frozen, _ = _forward_only_call(case, dtype, backend, requires_grad=False)
    assert not got.requires_grad and not frozen.requires_grad
    torch.testing.assert_close(got, want.detach(), atol=0, rtol=0)
    torch.testing.assert_close(frozen, want.detach(), atol=0, rtol=0)
    assert all(out[1].numel() == 0 for out in calls.outputs), [tuple(out[1].shape) for out in calls.outputs]
    assert len(calls.outputs) == (backend != "torch")
    assert len(kernel.addresses) == 3 * calls_with_grad and all(kernel.addresses[:calls_with_grad])
    assert all((address == 0) == (backend == "cpu") for address in kernel.addresses[calls_with_grad:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(300, 2, 64), (1000, 5, 8), (1, 2, 3)])
def test_cpu_kernel_writes_the_gradient_once_in_the_student_dtype(dtype, reduction, shape):
    """Issue 21 item 3 on the CPU: the kernel writes dL/ds once, in the student's dtype, with τ and the
    reduction's scale folded in; no fp32 buffer is scaled or cast after it (``loss.backward()`` hands it on)."""
    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled extension")
    n, num_classes, s = shape
    student, log_t, labels = make_inputs(n, num_classes, s, seed=n + s)
    labels[0] = -100 if n > 1 else labels[0]
    x = student.to(dtype).requires_grad_(True)
    kw = dict(num_classes=num_classes, n_subclasses=s, tau=2.0, alpha=0.1, reduction=reduction)
    loss = distill_loss(x, log_t.to(dtype), labels, backend="cpu", **kw)
    with _OpsOnShape(x.shape) as seen:
        loss.backward()
    assert set(seen.ops) <= {"aten.detach.default"}, seen.ops  # before: aten.mul_ (fp32), lelp_fast.scale_rows (bf16)
    _, want_grad = reference_loss_and_grad(x, log_t.to(dtype), labels, divergence_kind="kl", **kw)
    atol, rtol = TOL[dtype]
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), want_grad, atol=atol * 2 / n, rtol=rtol * 10)
    x.grad = None
    (3.0 * distill_loss(x, log_t.to(dtype), labels, backend="cpu", **kw)).backward()  # an AMP-like scale
    torch.testing.assert_close(x.grad.double(), 3.0 * want_grad, atol=atol * 6 / n, rtol=rtol * 10)


def test_the_cuda_kernel_refuses_a_null_gradient():
    """Forward only is the CPU kernel's (``grad = 0``); the CUDA kernel stores its gradient always, so
    the extension refuses a null address there instead of launching a kernel that writes through it
    (ops/loss.py passes it scratch)."""
    ext = _dispatch.extension()
    if ext is None or not getattr(ext, "has_cuda", False):
        pytest.skip("needs the extension built with CUDA")
    s, t, _ = make_inputs(4, 2, 3, seed=1)
    s, t = s.float(), t.float()
    out = torch.empty(4)
    with pytest.raises(ValueError, match="forward only"):  # raised before any CUDA call: no GPU needed
        ext.loss(s.data_ptr(), 0, 6, 4, 2, 3, t.data_ptr(), 0, 6, 1, 0, 0, -100, 0, 0.5, 1.0, 0.0, out.data_ptr(),
                 out.data_ptr(), 0, [], True, 0)


def test_an_extension_built_before_the_fold_takes_the_old_path(monkeypatch):
    """An older build of lelp_fast._C (A/B benchmarks load one beside the new) has no
    ``loss_folds_grad`` and takes no keyword arguments: the Python layer passes the row flags by
    position and scales and casts the fp32 gradient itself; nor ``loss_forward_only``: under
    ``torch.no_grad()`` it is given scratch to write its gradient into, not a null address."""
    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled extension")
    real = _dispatch.extension()

    class Older:
        def loss(self, *args):  # positional only, as the two old overloads were
            assert args[GRAD_ARG] != 0, "an older build writes its gradient: it needs an address"
            return real.loss(*args)

        def __getattr__(self, name):
            if name in ("loss_folds_grad", "loss_forward_only"):
                raise AttributeError(name)
            return getattr(real, name)

    monkeypatch.setattr(_dispatch, "extension", lambda: Older())
    student, log_t, labels = make_inputs(33, 3, 4, seed=5)
    for dtype in (torch.float32, torch.bfloat16):
        x = student.to(dtype).requires_grad_(True)
        loss = distill_loss(x, log_t.to(dtype), labels, num_classes=3, n_subclasses=4, tau=2.0, alpha=0.1,
                            backend="cpu")  # check_inputs=True: the row flags by position
        loss.backward()
        want, want_grad = reference_loss_and_grad(x, log_t.to(dtype), labels, num_classes=3, n_subclasses=4,
                                                  tau=2.0, alpha=0.1)
        atol, rtol = TOL[dtype]
        assert x.grad.dtype == dtype
        torch.testing.assert_close(loss.double(), want, atol=atol, rtol=rtol)
        torch.testing.assert_close(x.grad.double(), want_grad, atol=atol * 2 / 33, rtol=rtol * 10)
        with torch.no_grad():
            torch.testing.assert_close(distill_loss(x, log_t.to(dtype), labels, num_classes=3, n_subclasses=4,
                                                    tau=2.0, alpha=0.1, backend="cpu"), loss.detach(), atol=0, rtol=0)


def test_second_backward_is_refused_not_wrong():
    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled extension")
    student, log_t, labels = make_inputs(4, 2, 2, seed=11)
    x = student.float().requires_grad_(True)
    loss = distill_loss(x, log_t.float(), labels, num_classes=2, n_subclasses=2, backend="cpu")
    loss.backward(retain_graph=True)
    # the folded gradient; the error names the backend that takes it (a session-64 walkthrough)
    with pytest.raises(RuntimeError, match=r"backward through the same loss twice .*\(backend='torch' supports it\)"):
        loss.backward()
    rows = distill_loss(x, log_t.float(), labels, num_classes=2, n_subclasses=2, backend="cpu", reduction="none")
    rows.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # scaled in place per row
        rows.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_student_logits(backend):
    student, log_t, labels = make_inputs(20, 2, 3, seed=7)
    wide = torch.randn(20, 12)
    wide[:, ::2] = student.float()
    x = wide[:, ::2]
    got = distill_loss(x, log_t.float(), labels, num_classes=2, n_subclasses=3, backend=backend)
    want = reference.distillation_loss(student, log_t, labels, num_classes=2, n_subclasses=3)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_torch_compile_traces_the_fused_loss(monkeypatch):
    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled extension")
    student, log_t, labels = make_inputs(16, 2, 4, seed=8)

    def step(x, t, y):
        return distill_loss(x, t, y, num_classes=2, n_subclasses=4, alpha=0.2, backend="cpu")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = student.float().requires_grad_(True)
    loss = compiled(x, log_t.float(), labels)
    loss.backward()
    x2 = student.float().requires_grad_(True)
    eager = step(x2, log_t.float(), labels)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(x.grad, x2.grad)
    kernel = _GradientAddresses(_dispatch.extension())
    monkeypatch.setattr(_dispatch, "extension", lambda: kernel)
    with torch.no_grad():  # traced again, forward only
        torch.testing.assert_close(compiled(x, log_t.float(), labels), eager.detach())
    assert kernel.addresses == [0]


def test_torch_compile_with_dynamic_shapes_and_floats_traces_the_fused_loss():
    """``torch.compile(dynamic=True)`` makes the Python floats symbolic: the argument checks'
    ``math.isfinite(alpha)`` broke the graph (an error under ``fullgraph=True``) until 2026-12-05; they
    compare now. Two row counts run through the one dynamic graph."""
    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled extension")

    def step(x, t, y, alpha):
        return distill_loss(x, t, y, num_classes=2, n_subclasses=4, tau=2.0, alpha=alpha, backend="cpu",
                            check_inputs=False)

    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (16, 23):
        student, log_t, labels = make_inputs(n, 2, 4, seed=n)
        x, x2 = student.float().requires_grad_(True), student.float().requires_grad_(True)
        loss = compiled(x, log_t.float(), labels, 0.3)
        loss.backward()
        eager = step(x2, log_t.float(), labels, 0.3)
        eager.backward()
        torch.testing.assert_close(loss, eager)
        torch.testing.assert_close(x.grad, x2.grad)


def test_bad_arguments():
    student, log_t, labels = make_inputs(5, 2, 3, seed=9)
    x = student.float()
    with pytest.raises(ValueError, match="divergence must be one of"):
        distill_loss(x, log_t.float(), num_classes=2, n_subclasses=3, divergence="hellinger")
    with pytest.raises(ValueError, match=r"student_logits must have shape \(N, 6\)"):
        distill_loss(x[:, :5], log_t.float(), num_classes=2, n_subclasses=3)
    with pytest.raises(ValueError, match="exactly one of log_targets"):
        distill_loss(x, None, num_classes=2, n_subclasses=3)
    with pytest.raises(ValueError, match=r"per-row weights teacher_weights of shape \(\d+, 2\) are needed"):
        distill_loss(x, log_t.float().unsqueeze(1).repeat(1, 2, 1), num_classes=2, n_subclasses=3)
    bad = labels.clone()
    bad[2] = 5
    with pytest.raises(ValueError, match=r"labels\[2\] = 5 is out of range"):
        distill_loss(x, log_t.float(), bad, num_classes=2, n_subclasses=3)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        distill_loss(x, log_t.float(), num_classes=2, n_subclasses=3, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available() or not _dispatch.available("cuda", torch.device("cuda")),
                    reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
def test_cuda_loss_matches_reference(divergence):
    student, log_t, labels = make_inputs(1031, 5, 8, seed=10)
    x = student.float().cuda().requires_grad_(True)
    loss = distill_loss(x, log_t.float().cuda(), labels.cuda(), num_classes=5, n_subclasses=8,
                        divergence=divergence, alpha=0.3, backend="cuda")
    loss.backward()
    want, want_grad = reference_loss_and_grad(x.cpu(), log_t.float(), labels, num_classes=5, n_subclasses=8,
                                              divergence_kind=divergence, alpha=0.3)
    torch.testing.assert_close(loss.cpu().double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad.cpu().double(), want_grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_loss_outputs_are_fully_written(monkeypatch, backend):
    """Every loss/grad element is written by the kernel: its buffers start as NaN here."""
    import lelp_fast.ops.loss as loss_mod

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(loss_mod.torch, "empty", poisoned_empty)
    student, log_t, labels = make_inputs(77, 3, 7, seed=12)
    labels[::5] = -100
    x = student.float().requires_grad_(True)
    loss = distill_loss(x, log_t.float(), labels, num_classes=3, n_subclasses=7, alpha=0.2, reduction="none",
                        backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available() or not _dispatch.available("cuda", torch.device("cuda")),
                    reason="needs a GPU and the CUDA kernels")
def test_cuda_online_multi_teacher_matches_reference():
    n, num_classes, s = 517, 2, 8
    teachers = make_online_teachers(n, [64, 33], num_classes, s, seed=12)
    weights = torch.softmax(torch.randn(n, 2), 1)
    x = (torch.randn(n, num_classes * s) * 2).cuda().requires_grad_(True)
    loss = distill_loss(x, None, None, num_classes=num_classes, n_subclasses=s, embeddings=[t[0].cuda() for t in teachers],
                        fused_weight=[t[1].cuda() for t in teachers], fused_bias=[t[2].cuda() for t in teachers],
                        teacher_logits=[None if t[3] is None else t[3].cuda() for t in teachers], beta=[0.5, 2.0],
                        teacher_weights=weights.cuda(), backend="cuda")
    loss.backward()
    log_t = reference_online_mix(teachers, weights, num_classes * s, s, [0.5, 2.0], tau=1.0)
    want, want_grad = reference_loss_and_grad(x.cpu(), log_t, None, num_classes=num_classes, n_subclasses=s)
    torch.testing.assert_close(loss.cpu().double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad.cpu().double(), want_grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float16])
def test_kl_gradient_with_low_precision_targets(backend, target_dtype):
    """bf16/fp16 log-targets sum to 1 +- 1e-3: the KL gradient is tau (q Σt - t), whose rows sum to 0;
    the old tau (q - t) left tau (1 - Σt) in every row."""
    student, log_t, _ = make_inputs(64, 2, 8, seed=11)
    log_t = log_t.to(target_dtype)
    x = student.float().requires_grad_(True)
    loss = distill_loss(x, log_t, None, num_classes=2, n_subclasses=8, tau=2.0, backend=backend)
    loss.backward()
    _, want_grad = reference_loss_and_grad(x, log_t, None, num_classes=2, n_subclasses=8, tau=2.0)
    assert x.grad.double().sum(1).abs().max() < 1e-6
    torch.testing.assert_close(x.grad.double(), want_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
@pytest.mark.parametrize("where", ["targets", "student", "all_targets"])
def test_nan_input_never_gives_a_finite_loss(backend, divergence, where):
    """A NaN in the targets or the student logits propagates to the loss and that row's gradient."""
    student, log_t, _ = make_inputs(8, 2, 3, seed=12)
    student, log_t = student.float(), log_t.float()
    if where == "targets":
        log_t[3, 2] = float("nan")
    elif where == "all_targets":
        log_t[:] = float("nan")
    else:
        student[3, 1] = float("nan")
    x = student.requires_grad_(True)
    loss = distill_loss(x, log_t, None, num_classes=2, n_subclasses=3, divergence=divergence, backend=backend,
                        check_inputs=False)
    loss.backward()
    assert torch.isnan(loss)
    if divergence != "tvd" or where == "student":  # TVD's gradient is sign(q - t)/2, finite as in PyTorch
        assert torch.isnan(x.grad[3]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_teacher_weight_never_gives_a_finite_loss(backend):
    student, log_t, _ = make_inputs(6, 2, 2, seed=13, m=2)
    w = torch.full((6, 2), 0.5)
    w[2, 0] = float("nan")
    loss = distill_loss(student.float(), log_t.float(), None, num_classes=2, n_subclasses=2, teacher_weights=w,
                        backend=backend, reduction="none", check_inputs=False)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_checked_inputs_name_the_bad_row(backend):
    """On CPU eager the loss checks its inputs (check_inputs=True, the default) and names the row."""
    student, log_t, labels = make_inputs(8, 2, 3, seed=14)
    student, log_t = student.float(), log_t.float()
    kw = dict(num_classes=2, n_subclasses=3, backend=backend)
    bad_t = log_t.clone()
    bad_t[5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"log_targets.*row 5"):
        distill_loss(student, bad_t, labels, **kw)
    bad_s = student.clone()
    bad_s[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"student_logits.*row 2"):
        distill_loss(bad_s, log_t, labels, **kw)
    log_t[0, 0] = float("-inf")  # a target of exactly 0 is fine
    assert torch.isfinite(distill_loss(student, log_t, labels, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_check_fused_into_the_kernel_names_the_same_rows(backend, dtype):
    """Issue 21 item 13: the CPU kernel flags rows in its own pass (a row sum of the logits not finite,
    of the log-targets not <= 0) and only flagged rows are inspected; the errors are the unfused ones'."""
    student, log_t, labels = make_inputs(70, 2, 20, seed=40)
    student, log_t = student.to(dtype), log_t.to(dtype)
    kw = dict(num_classes=2, n_subclasses=20, alpha=0.1, backend=backend)
    bad_s = student.clone()
    bad_s[[33, 61], 7] = float("-inf")
    with pytest.raises(ValueError, match=r"student_logits row 33 contains NaN or Inf"):
        distill_loss(bad_s, log_t, labels, **kw)
    bad_t = log_t.clone()
    bad_t[45, 39] = float("nan")
    bad_t[50] = bad_t[50].exp()  # probabilities: every value > 0
    with pytest.raises(ValueError, match=r"log_targets row 45 contains NaN or \+Inf"):
        distill_loss(student, bad_t, labels, **kw)
    bad_t[45, 39] = -1.0
    with pytest.raises(ValueError, match=r"log_targets row 50 holds .* > 0"):
        distill_loss(student, bad_t, labels, **kw)
    # Finite rows whose fp32 sum overflows, and -Inf log-targets (probability 0), pass the check.
    big = student.clone()
    big[12, :4] = 3e38
    ok_t = log_t.clone()
    ok_t[3, :5] = float("-inf")
    distill_loss(big, ok_t, labels, **kw)
    assert torch.isfinite(distill_loss(student, ok_t, labels, **kw))
    # check_inputs=False: no check, the NaN propagates.
    bad_t[45, 39] = float("nan")
    per_row = distill_loss(student, bad_t, labels, check_inputs=False, reduction="none", **kw)
    assert torch.isnan(per_row[45]) and torch.isfinite(per_row[:45]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_check_covers_every_teacher_even_with_weight_zero(backend):
    student, log_t, _ = make_inputs(9, 2, 3, seed=41, m=3)
    weights = torch.tensor([[0.5, 0.5, 0.0]] * 9)
    bad_t = log_t.float().clone()
    bad_t[4, 2, 1] = float("nan")  # teacher 2 has weight 0 in every row
    with pytest.raises(ValueError, match=r"log_targets row 4 contains NaN"):
        distill_loss(student.float(), bad_t, None, teacher_weights=weights, num_classes=2, n_subclasses=3,
                     backend=backend)


def test_kernel_row_flags():
    """The flags themselves (bit 0: logits row sum not finite; bit 1: a log-target row sum not <= 0)."""
    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled extension")
    from lelp_fast.ops.loss import _loss_rows

    student, log_t, labels = make_inputs(11, 3, 7, seed=42)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s, t = student.to(dtype), log_t.to(dtype)
        s[2, 3], s[7, 0] = float("nan"), float("inf")
        t[7, 1], t[9], t[10, :] = float("nan"), 0.5, float("-inf")  # row 9: probabilities
        out = _loss_rows(s, t, None, labels, [], [], [], [], 3, 7, 0, 0.5, 1.0, 0.0, [], -100, "cpu", False, True)
        want = torch.zeros(11, dtype=torch.uint8)
        want[2], want[7], want[9] = 1, 3, 2
        assert torch.equal(out[3], want), dtype
        assert _loss_rows(s, t, None, labels, [], [], [], [], 3, 7, 0, 0.5, 1.0, 0.0, [], -100, "cpu", False)[3].numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_weights_are_validated(backend):
    student, log_t, _ = make_inputs(6, 2, 2, seed=15, m=2)
    kw = dict(num_classes=2, n_subclasses=2, backend=backend)
    for bad, pattern in ((torch.full((6, 2), 5.0), r"teacher_weights.*row 0.*sum to 1"),
                         (torch.tensor([[0.5, 0.5]] * 3 + [[1.5, -0.5]] + [[0.5, 0.5]] * 2), r"row 3.*>= 0"),
                         (torch.tensor([[0.5, 0.5]] * 4 + [[float("nan"), 1.0]] + [[0.5, 0.5]]), r"row 4.*NaN")):
        with pytest.raises(ValueError, match=pattern):
            distill_loss(student.float(), log_t.float(), None, teacher_weights=bad, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_fractional_float_labels_are_refused(backend, dtype):
    """Float labels (y + 0.5) gave exactly the integer-label loss; now a clear error names labels."""
    student, log_t, labels = make_inputs(5, 2, 2, seed=16)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        distill_loss(student.float(), log_t.float(), labels.to(dtype) + 0.5, num_classes=2, n_subclasses=2,
                     alpha=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("jsd_beta", [0.0, 0.1, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generalised_jsd_matches_reference(backend, jsd_beta, dtype):
    student, log_t, labels = make_inputs(37, 3, 5, seed=17)
    x = student.to(dtype).requires_grad_(True)
    kw = dict(num_classes=3, n_subclasses=5, tau=1.5, alpha=0.2)
    loss = distill_loss(x, log_t.float(), labels, divergence="js", jsd_beta=jsd_beta, backend=backend, **kw)
    loss.backward()
    want, want_grad = reference_loss_and_grad(x, log_t.float(), labels, divergence_kind="js", jsd_beta=jsd_beta,
                                              **kw)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss.double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.double(), want_grad.to(dtype).double(), atol=atol * 2, rtol=rtol * 10)
    with pytest.raises(ValueError, match="jsd_beta must lie in"):
        distill_loss(x, log_t.float(), labels, divergence="js", jsd_beta=1.5, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_and_hard_parts_come_from_the_same_pass(backend, reduction):
    """return_components=True: (loss, τ²·D part, α·CE part), the parts summing to the loss."""
    student, log_t, labels = make_inputs(29, 3, 4, seed=18)
    labels[4] = -100
    kw = dict(num_classes=3, n_subclasses=4, tau=2.0, alpha=0.3, reduction=reduction)
    x = student.float().requires_grad_(True)
    loss, soft, hard = distill_loss(x, log_t.float(), labels, backend=backend, return_components=True, **kw)
    s64 = student.double()
    want_hard = reference.reduce_rows(0.3 * reference.hard_label_rows(s64, labels, 3, 4), labels, -100, reduction)
    want = reference.distillation_loss(s64, log_t, labels, **kw)
    torch.testing.assert_close(hard.double(), want_hard, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(soft.double(), want - want_hard, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(loss.double(), want, atol=2e-5, rtol=1e-5)
    assert not soft.requires_grad and not hard.requires_grad
    loss.sum().backward()  # the loss itself still trains
    assert torch.isfinite(x.grad).all()
    _, _, zero = distill_loss(x, log_t.float(), labels, backend=backend, return_components=True,
                              num_classes=3, n_subclasses=4)
    assert float(zero.abs().sum()) == 0.0  # alpha = 0: no hard part



@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda_emu"])  # resolved before dispatch
def test_jsd_is_an_alias_of_js(backend):
    # TRL (GKD) and Liger-Kernel call the generalised JSD "jsd"; their beta is our jsd_beta.
    student, log_t, labels = make_inputs(33, 3, 4, seed=5)
    want, want_grad = reference_loss_and_grad(student, log_t, labels, num_classes=3, n_subclasses=4,
                                              divergence_kind="js", jsd_beta=0.3, tau=1.7, alpha=0.2)
    s = student.float().requires_grad_(True)
    got = distill_loss(s, log_t.float(), labels, num_classes=3, n_subclasses=4, divergence="jsd", jsd_beta=0.3,
                       tau=1.7, alpha=0.2, backend=backend)
    got.backward()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s.grad.double(), want_grad, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="divergence must be one of .*'jsd' = 'js'.*got 'jensen'"):
        distill_loss(s, log_t.float(), labels, num_classes=3, n_subclasses=4, divergence="jensen")


# The subclass weight λ (one kernel pass, or two calls of the fused loss on torch) against the fp64
# formula written from its parts.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_subclass_weight_matches_the_reference(backend, dtype, weight, reduction):
    student, log_t, labels = make_inputs(37, 3, 4, seed=11)
    labels[[2, 5]] = -100
    x = student.to(dtype).requires_grad_(True)
    loss = distill_loss(x, log_t.to(dtype), labels, num_classes=3, n_subclasses=4, tau=1.7, subclass_weight=weight,
                        reduction=reduction, backend=backend)
    grad_out = torch.full_like(loss.detach().float(), 0.37)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    s = x.detach().double().requires_grad_(True)
    rows = reference.subclass_weighted_kl(s, log_t.to(dtype).double(), 3, 4, 1.7, weight)
    rows = torch.where(labels != -100, rows, torch.zeros_like(rows))
    want = reference.reduce_rows(rows, labels, -100, reduction)
    (want_grad,) = torch.autograd.grad(want, s, grad_out.double())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss.double(), want.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.double(), want_grad, atol=atol * 2, rtol=rtol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subclass_weight_end_points_are_lelp_and_pooled_kd(backend):
    student, log_t, labels = make_inputs(29, 2, 3, seed=5)
    kw = dict(num_classes=2, n_subclasses=3, tau=2.0, backend=backend)
    x = student.float()
    lelp = distill_loss(x, log_t.float(), labels, **kw)
    torch.testing.assert_close(distill_loss(x, log_t.float(), labels, subclass_weight=1.0 - 1e-12, **kw), lelp,
                               atol=1e-5, rtol=1e-5)
    pooled = reference.class_logits(student, 2, 3, 2.0)
    log_p = torch.logsumexp(log_t.view(29, 2, 3), -1)
    kd = reference.distillation_loss(pooled, log_p, labels, num_classes=2, n_subclasses=1, tau=2.0)
    torch.testing.assert_close(distill_loss(x, log_t.float(), labels, subclass_weight=0.0, **kw).double(), kd,
                               atol=1e-5, rtol=1e-5)


def test_subclass_weight_with_alpha_and_components():
    student, log_t, labels = make_inputs(17, 2, 4, seed=3)
    loss, soft, hard = distill_loss(student.float(), log_t.float(), labels, num_classes=2, n_subclasses=4,
                                    alpha=0.5, subclass_weight=0.5, return_components=True)
    want_soft = reference.subclass_weighted_kl(student, log_t, 2, 4, 1.0, 0.5).mean()
    want_hard = 0.5 * reference.hard_label_rows(student, labels, 2, 4).mean()
    torch.testing.assert_close(soft.double(), want_soft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hard.double(), want_hard, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.double(), want_soft + want_hard, atol=1e-5, rtol=1e-5)


def test_subclass_weight_refuses_what_it_cannot_split():
    student, log_t, labels = make_inputs(5, 2, 2, seed=0)
    with pytest.raises(ValueError, match="subclass_weight needs divergence='kl'"):
        distill_loss(student.float(), log_t.float(), labels, num_classes=2, n_subclasses=2, divergence="js",
                     subclass_weight=0.5)
    with pytest.raises(ValueError, match="subclass_weight must be >= 0"):
        distill_loss(student.float(), log_t.float(), labels, num_classes=2, n_subclasses=2, subclass_weight=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subclass_weight_takes_mixed_and_online_targets(backend):
    """λ ≠ 1 with (N, M, K) targets and teacher weights, or online teachers (one, or several mixed):
    the CPU/CUDA kernels and Triton (C <= 16) take them in one pass, torch makes the targets first,
    then two fused calls; the fp64 formula on the mixed targets."""
    n, num_classes, s, tau = 23, 3, 4, 1.5
    k = num_classes * s
    student, log_t, labels = make_inputs(n, num_classes, s, seed=8, m=2)
    weights = torch.softmax(torch.randn(n, 2, generator=torch.Generator().manual_seed(9)), 1)
    x = student.float().requires_grad_(True)

    def check(loss, mixed):
        (grad,) = torch.autograd.grad(loss, x)
        ref = student.detach().requires_grad_(True)
        want = reference.subclass_weighted_kl(ref, mixed, num_classes, s, tau, 0.3).mean()
        (want_grad,) = torch.autograd.grad(want, ref)
        torch.testing.assert_close(loss.double(), want.detach(), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(grad.double(), want_grad, atol=2e-5, rtol=1e-4)

    kw = dict(num_classes=num_classes, n_subclasses=s, tau=tau, subclass_weight=0.3, backend=backend)
    check(distill_loss(x, log_t.float(), labels, teacher_weights=weights, **kw),
          reference.mix_log_targets(log_t.float().double(), weights.double()))
    teachers = make_online_teachers(n, [11, 6], num_classes, s, seed=10)
    online = dict(embeddings=[t[0] for t in teachers], fused_weight=[t[1] for t in teachers],
                  fused_bias=[t[2] for t in teachers], teacher_logits=[t[3] for t in teachers], beta=[0.5, 0.25])
    check(distill_loss(x, None, labels, teacher_weights=weights, **online, **kw),
          reference_online_mix(teachers, weights, k, s, [0.5, 0.25], tau))
    one = {key: value[0] for key, value in online.items()}
    check(distill_loss(x, None, labels, **one, **kw),
          reference_online_mix(teachers[:1], torch.ones(n, 1), k, s, [0.5], tau))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled CPU extension")
@pytest.mark.parametrize("backend", ["cpu", "cuda_emu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "one row", "odd K", "long classes", "huge logits", "empty class",
                                  "sharp targets", "alpha", "alpha tau 1", "alpha tau 2", "alpha, label far below"])
def test_kernel_takes_the_subclass_weight_in_one_pass(backend, dtype, case):
    """λ ≠ 1 in the CPU and CUDA kernels (the CUDA one's body on the host): one kernel call (it was
    two, plus torch's pooling and its backward), equal
    to the fp64 formula written from its parts, loss and gradient, at the edges too: a class whose
    logits are ~200 below the row's (its q underflows), a class with no target mass, near one-hot
    targets, the hard-label term (at tau = 1 and 2 the CPU kernel adds it in the KL pass, with a
    row whose labelled class is 400 below the rest taking the exact path)."""
    n, c, s = {"one row": (1, 2, 4), "odd K": (19, 5, 3), "long classes": (11, 2, 64)}.get(case, (29, 3, 4))
    student, log_t, labels = make_inputs(n, c, s, seed=len(case))
    if case == "huge logits":
        student[:, s:2 * s] -= 200.0  # class 1 far below: its unnormalised q is 0 in fp32
    if case == "empty class":
        log_t = log_t.view(n, c, s).clone()
        log_t[:, 1] = -float("inf")
        log_t = torch.log_softmax(log_t.view(n, c * s), -1)
    if case == "sharp targets":
        log_t = torch.log_softmax(log_t * 40.0, -1)
    if case == "alpha, label far below":
        student[1, labels[1] * s:(labels[1] + 1) * s] -= 400.0
    alpha = 0.3 if case.startswith("alpha") else 0.0
    tau = {"alpha tau 1": 1.0, "alpha tau 2": 2.0, "alpha, label far below": 2.0}.get(case, 1.3)
    x = student.to(dtype).requires_grad_(True)
    with _OpCalls(torch.ops.lelp_fast.loss_rows.default) as kernel:
        loss, soft, hard = distill_loss(x, log_t.float(), labels, num_classes=c, n_subclasses=s, tau=tau, alpha=alpha,
                                        subclass_weight=0.1, backend=backend, return_components=True)
        (grad,) = torch.autograd.grad(loss, x)
    assert kernel.count == 1
    ref = x.detach().double().requires_grad_(True)
    want_soft = reference.subclass_weighted_kl(ref, log_t.float().double(), c, s, tau, 0.1).mean()
    want = want_soft + alpha * reference.hard_label_rows(ref, labels, c, s).mean()
    (want_grad,) = torch.autograd.grad(want, ref)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(loss.double(), want.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(soft.double(), want_soft.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.double(), want_grad.to(dtype).double(), atol=atol * 2 if dtype == torch.float32
                               else 1e-2 / n, rtol=rtol * 10 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled CPU extension")
@pytest.mark.parametrize("backend", ["cpu", "cuda_emu"])
def test_kernel_subclass_weight_propagates_nan(backend):
    student, log_t, labels = make_inputs(6, 2, 4, seed=2)
    student[3, 1] = float("nan")
    loss = distill_loss(student.float(), log_t.float(), labels, num_classes=2, n_subclasses=4, subclass_weight=0.1,
                        backend=backend, check_inputs=False, reduction="none")
    assert torch.isnan(loss[3]) and torch.isfinite(loss[[0, 1, 2, 4, 5]]).all()


def test_subclass_weight_none_is_the_library_default_and_s1_ignores_it():
    student, log_t, labels = make_inputs(19, 2, 3, seed=4)
    kw = dict(num_classes=2, n_subclasses=3, tau=1.3)
    torch.testing.assert_close(distill_loss(student.float(), log_t.float(), labels, subclass_weight=None, **kw),
                               distill_loss(student.float(), log_t.float(), labels, subclass_weight=0.1, **kw))
    torch.testing.assert_close(  # the op's own default is the formula, λ = 1
        distill_loss(student.float(), log_t.float(), labels, **kw),
        reference.distillation_loss(student, log_t, labels, **kw).float(), atol=1e-5, rtol=1e-5)
    z = torch.log_softmax(torch.randn(19, 2, dtype=torch.float64), -1).float()
    for weight in (None, 0.0, 0.1, 3.0):
        assert torch.equal(distill_loss(student[:, :2].float(), z, labels, num_classes=2, n_subclasses=1, tau=3.0,
                                        subclass_weight=weight),
                           distill_loss(student[:, :2].float(), z, labels, num_classes=2, n_subclasses=1, tau=3.0))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled CPU extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "strided student", "strided targets"])
def test_padded_rows_of_odd_width_match_reference(dtype, layout):
    """K = 39 (3 x 13) KL rows are held padded to 40 columns in the CPU kernel: converted per block and
    spread when the input is contiguous, row by row when its rows are strided; the gradient packed
    back per block. Several blocks of rows, the mean's scale, labels with an ignored row. (K = 15 ran
    here before the lane layout took KL rows of K <= 32.)"""
    n, c, s = 150, 3, 13
    student, log_t, labels = make_inputs(n, c, s, seed=77)
    labels[5] = -100
    x = student.to(dtype)
    if layout == "strided student":  # rows of 39 values 44 apart
        wide = torch.zeros(n, 44, dtype=dtype)
        wide[:, :39] = x
        x = wide[:, :39].detach()
        assert x.stride(0) == 44
    t = log_t.to(dtype)
    if layout == "strided targets":
        wide_t = torch.zeros(n, 45, dtype=dtype)
        wide_t[:, 3:42] = t
        t = wide_t[:, 3:42]
    x.requires_grad_(True)
    kw = dict(num_classes=c, n_subclasses=s, tau=2.0, alpha=0.2)
    loss = distill_loss(x, t, labels, backend="cpu", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    want, want_grad = reference_loss_and_grad(x, t, labels, divergence_kind="kl", **kw)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss.double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.double(), want_grad, atol=atol, rtol=rtol * 10)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled CPU extension")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("shape", [(10, 1), (5, 2), (3, 5), (2, 8), (4, 8)])
def test_lane_layout_rows_match_reference(dtype, tau, shape):
    """KL rows of K <= 32 run with 16 rows across the vector lanes in the CPU kernel (csrc/cpu/lane_loss.h):
    141 rows (blocks of 64 rows, then a group of 13 and 3 unused lanes), ignored rows, a labelled class
    underflowing against the row max (the α term's exact fallback, redone row-major) in a full group and
    in the tail, a target of exactly 0; α at τ = 1, 2 (folded into the KL pass) and 0.7 (a pass of its
    own); per-row losses, their α·CE parts, the mean's scale folded into the gradient; strided rows; a
    NaN row stays NaN; the fused check names a bad row in the tail."""
    c, s = shape
    n, k = 141, c * s
    student, log_t, labels = make_inputs(n, c, s, seed=k + 7)
    labels[[4, 130]] = -100
    for row, gap in ((1, 400.0), (135, 400.0), (2, 100.0)):
        student[row, labels[row] * s:(labels[row] + 1) * s] -= gap
    log_t[133, 0] = float("-inf")
    log_t[133] = torch.log_softmax(log_t[133], 0)
    x = student.to(dtype).requires_grad_(True)
    t = log_t.to(dtype)
    kw = dict(num_classes=c, n_subclasses=s, tau=tau, alpha=0.3)
    atol, rtol = TOL[dtype]
    loss, _, hard = distill_loss(x, t, labels, backend="cpu", reduction="none", return_components=True, **kw)
    want = reference.distillation_loss(x.detach().double(), t.double(), labels, reduction="none", **kw)
    want_hard = 0.3 * reference.hard_label_rows(x.detach().double(), labels, c, s)
    want_hard[labels == -100] = 0.0
    torch.testing.assert_close(loss.double(), want, atol=atol * 4, rtol=rtol)
    torch.testing.assert_close(hard.double(), want_hard, atol=atol * 4, rtol=rtol)
    for strided in (False, True):
        xs = torch.zeros(n, k + 3, dtype=dtype)[:, 1:k + 1] if strided else torch.empty(n, k, dtype=dtype)
        xs = xs.copy_(x.detach()).requires_grad_(True)
        (grad,) = torch.autograd.grad(distill_loss(xs, t, labels, backend="cpu", **kw), xs)
        _, want_grad = reference_loss_and_grad(xs, t, labels, divergence_kind="kl", **kw)
        torch.testing.assert_close(grad.double(), want_grad, atol=atol * 2 / n, rtol=rtol * 10)
    bad = x.detach().clone()
    bad[137, k // 2] = float("nan")
    per_row = distill_loss(bad, t, labels, backend="cpu", reduction="none", check_inputs=False, **kw)
    assert torch.isnan(per_row[137]) and torch.isfinite(per_row[torch.arange(n) != 137]).all()
    with pytest.raises(ValueError, match=r"student_logits row 137 contains NaN or Inf"):
        distill_loss(bad, t, labels, backend="cpu", **kw)
    bad_t = t.clone()
    bad_t[139, 0] = float("inf")
    with pytest.raises(ValueError, match=r"log_targets row 139 contains NaN or \+Inf"):
        distill_loss(x.detach(), bad_t, labels, backend="cpu", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teachers", [1, 2])
def test_online_vanilla_kd_teachers_read_no_embeddings(backend, teachers):
    """Online teachers with S = 1 and their logits given are vanilla KD: their targets are
    log_softmax(z / τ) whatever their embeddings hold, on every backend, and the default check names
    their logits, not the embeddings (as lelp_targets). Before, the torch and CPU paths projected h
    (NaN embeddings: NaN loss unchecked, an embeddings error checked) where Triton did not."""
    g = torch.Generator().manual_seed(31)
    n, c = 40, 3
    s = torch.randn(n, c, generator=g)
    zs = [torch.randn(n, c, generator=g) * 2 for _ in range(teachers)]
    hs = [torch.full((n, 6), float("nan")) for _ in range(teachers)]
    ws = [torch.randn(6, c, generator=g) for _ in range(teachers)]
    bs = [torch.randn(c, generator=g) for _ in range(teachers)]
    weights = torch.full((n, teachers), 1.0 / teachers) if teachers > 1 else None
    one = teachers == 1
    kw = dict(num_classes=c, n_subclasses=1, tau=1.7, teacher_weights=weights, backend=backend)
    x = s.clone().requires_grad_(True)
    loss = distill_loss(x, embeddings=hs[0] if one else hs, fused_weight=ws[0] if one else ws,
                        fused_bias=bs[0] if one else bs, teacher_logits=zs[0] if one else zs, **kw)
    loss.backward()
    log_t = torch.stack([torch.log_softmax(z / 1.7, dim=1) for z in zs], 1)
    y = s.clone().requires_grad_(True)
    want = distill_loss(y, log_t[:, 0] if one else log_t, **kw)
    want.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-7, rtol=1e-5)
    zs[-1][7, 1] = float("nan")
    with pytest.raises(ValueError, match=f"teacher_logits\\[{teachers - 1}\\] row 7 contains NaN"):
        distill_loss(s, embeddings=hs[0] if one else hs, fused_weight=ws[0] if one else ws,
                     fused_bias=bs[0] if one else bs, teacher_logits=zs[0] if one else zs, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_a_temperature_that_is_not_a_positive_number_is_refused(backend, tau):
    """ops.distill_loss took any τ: 0 and NaN gave a NaN loss, -1 a finite loss of the wrong sign of
    logits, with no error (LELPLoss and the targets op already refused them)."""
    student, log_t, labels = make_inputs(5, 2, 3, seed=19)
    online = dict(embeddings=torch.randn(5, 8), fused_weight=torch.randn(8, 8), fused_bias=torch.zeros(8))
    calls = [dict(log_targets=log_t.float()), dict(log_targets=None, **online),
             dict(log_targets=log_t.float(), subclass_weight=0.5),
             dict(log_targets=None, teacher_logits=torch.randn(5, 2), n_subclasses=1)]
    for call in calls:
        kw = dict(num_classes=2, n_subclasses=3, labels=labels, alpha=0.1, backend=backend, tau=tau) | call
        x = student[:, :2 * kw["n_subclasses"]].float()
        with pytest.raises(ValueError, match="tau must be a positive finite number"):
            distill_loss(x, **kw)


def test_three_dimensional_targets_without_weights_say_what_they_are_taken_for():
    """(N, 1, K) targets without teacher_weights were refused as "teacher_weights must have shape
    (64, 1) for M teachers", which did not say that a 3-D tensor is read as M teachers' targets, nor
    what one teacher's shape is (a session-64 walkthrough)."""
    student, log_t, _ = make_inputs(64, 2, 2, seed=20)
    with pytest.raises(ValueError, match=r"log_targets of shape \(64, 1, 4\) are M = 1 teachers' targets, whose "
                                         r"per-row weights teacher_weights of shape \(64, 1\) are needed \(none were "
                                         r"given\); one teacher's are \(64, 4\)"):
        distill_loss(student.float(), log_t.float().unsqueeze(1), num_classes=2, n_subclasses=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_on_targets_of_exactly_0_is_refused_and_int32_labels_work_on_every_backend(backend):
    """A session-65 walkthrough: reverse KL on a top-k store's targets (other classes at log 0 =
    -inf) returned inf with no message; int32 labels worked on the CPU kernel and raised torch's
    "expected target dtype to be Long" on the torch backend; bf16 mixing weights that summed to 1
    before rounding were refused."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(6, 4, generator=g)
    log_t = torch.log_softmax(torch.randn(6, 4, generator=g), -1)
    log_t[2, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"log_targets row 2 has a target of exactly 0.*reverse_kl"):
        distill_loss(s, log_t, num_classes=4, n_subclasses=1, divergence="reverse_kl", backend=backend)
    two = torch.stack([log_t, torch.log_softmax(torch.randn(6, 4, generator=g), -1)], 1)  # the mixture has no 0
    half = torch.full((6, 2), 0.5)
    assert torch.isfinite(distill_loss(s, two, num_classes=4, n_subclasses=1, divergence="reverse_kl",
                                       teacher_weights=half, backend=backend))
    with pytest.raises(ValueError, match=r"log_targets row 2 has a target of exactly 0"):
        distill_loss(s, two, num_classes=4, n_subclasses=1, divergence="reverse_kl",
                     teacher_weights=torch.tensor([[1.0, 0.0]] * 6), backend=backend)
    ignored = torch.tensor([0, 1, -100, 3, 0, 1])  # the row counts for nothing
    assert torch.isfinite(distill_loss(s, log_t, ignored, num_classes=4, n_subclasses=1, divergence="reverse_kl",
                                       backend=backend))
    assert torch.isfinite(distill_loss(s, log_t, num_classes=4, n_subclasses=1, backend=backend))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    want = distill_loss(s.double(), log_t.double(), y, num_classes=4, n_subclasses=1, alpha=0.5, backend="torch")
    got = distill_loss(s, log_t, y.int(), num_classes=4, n_subclasses=1, alpha=0.5, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    mixed = torch.log_softmax(torch.randn(6, 2, 4, generator=g), -1)
    weights = torch.tensor([[0.2, 0.8]] * 6).bfloat16()  # 0.2012 + 0.8008: 2e-3 off after rounding
    assert torch.isfinite(distill_loss(s, mixed, num_classes=4, n_subclasses=1, teacher_weights=weights,
                                       backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "js"])
@pytest.mark.parametrize("masked", ["one logit", "a whole class"])
def test_a_masked_logit_gives_the_row_a_finite_gradient(backend, divergence, masked):
    """A student logit of -inf (masked) makes its q = 0 and log q = -inf: the fp64 reference and the
    torch backend, which is built on it, gave the whole row NaN gradients in reverse KL and JS (0 · inf
    in the untaken branch of 0 · log 0), where the compiled kernels gave the gradient (a session-66
    audit). Its column's gradient is 0."""
    x = torch.tensor([[0.0, -float("inf"), 1.0, 2.0]])
    if masked == "a whole class":
        x[0, 0] = -float("inf")
    log_t = torch.log_softmax(torch.tensor([[0.0, 1.0, 0.5, 0.2]]), -1)
    s = x.clone().requires_grad_(True)
    loss = distill_loss(s, log_t, None, num_classes=2, n_subclasses=2, tau=0.5, divergence=divergence,
                        check_inputs=False, backend=backend)
    loss.backward()
    want, want_grad = reference_loss_and_grad(x, log_t, None, num_classes=2, n_subclasses=2, tau=0.5,
                                              divergence_kind=divergence)
    assert torch.isfinite(want_grad).all() and torch.isfinite(s.grad).all(), (want_grad, s.grad)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), want_grad, rtol=1e-4, atol=1e-5)
    assert s.grad[0, 1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_class_bf16_targets_at_the_default_lambda(backend):
    """C = 1, λ = 0.1, bf16 targets from lelp_targets: the torch backend pooled them to a log p of
    2.4e-3 > 0 (their bf16 rounding) and refused that as a log-probability, naming a value the caller's
    targets do not hold (a session-66 audit); the targets given pass the check."""
    from lelp_fast import lelp_targets

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(32, 8, generator=g), torch.randn(8, 8, generator=g) * 0.1
    log_t = lelp_targets(h, w, torch.zeros(8), 1, 8, teacher_logits=torch.zeros(32, 1), beta=1.0,
                         out_dtype=torch.bfloat16)
    s = torch.randn(32, 8, generator=g)
    got = distill_loss(s, log_t, None, num_classes=1, n_subclasses=8, subclass_weight=0.1, backend=backend)
    want = reference.subclass_weighted_kl(s.double(), log_t.double(), 1, 8, 1.0, 0.1).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
