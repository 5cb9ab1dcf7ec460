"""The reference against an independent fp64 numpy computation, its invariants and gradients."""

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as np_log_softmax

from lelp_fast import reference
from conftest import make_problem


def numpy_fit(h, y, num_classes, s, w=None, rotations=None):
    """LELP fit (DESIGN §1 steps 1-5) written independently with numpy."""
    h = np.asarray(h, dtype=np.float64)
    if w is not None:
        w = np.asarray(w, dtype=np.float64)
        proj = np.eye(h.shape[1]) - w.T @ np.linalg.pinv(w @ w.T) @ w
        h = h @ proj
    a_cols, e = [], []
    for c in range(num_classes):
        hc = h[y == c]
        mu = hc.mean(0)
        cov = np.cov(hc, rowvar=False)
        evals, evecs = np.linalg.eigh(cov)
        v = evecs[:, ::-1][:, :s]
        v = v * np.sign(v[np.abs(v).argmax(0), np.arange(s)])
        if rotations is not None:
            v = v @ rotations[c]
        sigma = np.sqrt(np.einsum("ds,de,es->s", v, cov, v))
        a_cols.append(v / sigma)
        e.append(-(v.T @ mu) / sigma)
    return np.concatenate(a_cols, 1), np.concatenate(e)


@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("rotate", [False, True])
def test_fit_matches_numpy(with_head, rotate):
    h, w, _, y = make_problem(n=400, d=17, num_classes=3, seed=1)
    rot = reference.class_rotations(3, 4, seed=5).numpy() if rotate else None
    a, e = reference.fit_reference(
        h, y, 3, 4, head_weight=w if with_head else None, null_space=with_head, rotate=rotate, seed=5
    )
    a_np, e_np = numpy_fit(h.numpy(), y.numpy(), 3, 4, w.numpy() if with_head else None, rot)
    np.testing.assert_allclose(a.numpy(), a_np, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(e.numpy(), e_np, rtol=1e-8, atol=1e-10)


def test_targets_match_numpy():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(37, 3 * 5, generator=g, dtype=torch.float64) * 4
    z = torch.randn(37, 3, generator=g, dtype=torch.float64) * 4
    got = reference.log_targets(u, z, 5, beta=0.7, tau=1.9).numpy()
    want = (np_log_softmax(z.numpy() / 1.9, axis=1)[:, :, None]
            + np_log_softmax(u.numpy().reshape(37, 3, 5) / 0.7, axis=2)).reshape(37, 15)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_target_invariants():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(50, 2 * 6, generator=g, dtype=torch.float64)
    z = torch.randn(50, 2, generator=g, dtype=torch.float64) * 3
    log_t = reference.log_targets(u, z, 6, beta=0.5, tau=2.0)
    t = log_t.exp()
    torch.testing.assert_close(t.sum(1), torch.ones(50, dtype=torch.float64))
    # Subclass probabilities of class c sum to the teacher's class probability.
    torch.testing.assert_close(t.reshape(50, 2, 6).sum(-1), torch.softmax(z / 2.0, -1))
    # S = 1 is exactly vanilla KD.
    kd = reference.log_targets(u[:, :2], z, 1, beta=0.5, tau=2.0)
    torch.testing.assert_close(kd, torch.log_softmax(z / 2.0, -1))


def test_targets_in_fp32_shift_before_scaling():
    """log_targets in fp32 (the torch backend's, compact stores', the tuner's) divided z by τ and u by β
    before the log-softmax's shift: z = 3e38 at τ = 0.5 overflowed to NaN targets, and u/β ≈ 1e6
    (β = 1e-6) rounded to 0.06, 0.019 off the fp64 targets. Each is now shifted by its max first."""
    u = torch.tensor([[1.0, 1.0 - 7e-7] * 3, [0.5, -0.25] * 3])
    z = torch.tensor([[3e38, 1.0, 0.0], [0.3, -1.0, 2.0]])
    got = reference.log_targets(u, z, 2, beta=1e-6, tau=0.5).double()
    want = reference.log_targets(u.double(), z.double(), 2, beta=1e-6, tau=0.5)
    assert not got.isnan().any() and torch.isneginf(got[0, 2:]).all()  # -6e38 in fp64
    torch.testing.assert_close(got[0, :2], want[0, :2], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-6)  # log t of -7.5e5: fp32 holds 0.06
    padded = torch.tensor([[0.0, float("-inf")] * 3])  # a padded subclass slot's -inf bias: its target is 0
    assert torch.isneginf(reference.log_targets(padded, z[1:], 2, beta=0.1)[0, 1::2]).all()


def test_class_logits_in_fp32_shift_before_scaling():
    """class_logits (the pooled prediction, τ·logsumexp(s/τ)) in fp32 divided s by τ first: logits
    near 1.8e38 at τ = 0.5 gave +inf class logits. Now the fp64 values, shifted by each class's max."""
    s = torch.tensor([[1.8e38, 1.79e38, 1.0, 0.5], [0.3, -1.0, 2.0, 1.5]])
    got = reference.class_logits(s, 2, 2, tau=0.5).double()
    want = reference.class_logits(s.double(), 2, 2, tau=0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_rotation_keeps_the_subspace():
    h, _, _, y = make_problem(n=300, d=12, num_classes=2, seed=2)
    _, _, covs = reference.class_moments(h, y, 2)
    plain, _, _ = reference.class_subspaces(covs, 3, rotate=False, standardize=False)
    rotated, _, _ = reference.class_subspaces(covs, 3, rotate=True, standardize=False, seed=9)
    for c in range(2):
        p_plain = plain[c] @ plain[c].T
        p_rot = rotated[c] @ rotated[c].T
        torch.testing.assert_close(p_plain, p_rot)
        # The rotation is orthonormal: the columns stay orthonormal.
        torch.testing.assert_close(rotated[c].T @ rotated[c], torch.eye(3, dtype=torch.float64))
    assert not torch.allclose(plain, rotated)


def test_haar_rotation_is_orthogonal_and_seeded():
    q1 = reference.class_rotations(2, 5, seed=0)
    q2 = reference.class_rotations(2, 5, seed=0)
    q3 = reference.class_rotations(2, 5, seed=1)
    torch.testing.assert_close(q1, q2)
    assert not torch.allclose(q1, q3)
    torch.testing.assert_close(q1[0] @ q1[0].T, torch.eye(5, dtype=torch.float64))


def test_null_space_projector():
    _, w, _, _ = make_problem(d=10, num_classes=3)
    p = reference.null_space_projector(w)
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(w @ p, torch.zeros_like(w), atol=1e-12, rtol=0)
    assert torch.linalg.matrix_rank(p) == 7


def test_standardized_coordinates_have_unit_variance_and_zero_mean():
    h, w, _, y = make_problem(n=500, d=20, num_classes=2, seed=6)
    a, e = reference.fit_reference(h, y, 2, 3, head_weight=w)
    u = h @ a + e
    for c in range(2):
        uc = u[y == c][:, c * 3:(c + 1) * 3]
        torch.testing.assert_close(uc.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
        torch.testing.assert_close(uc.var(0), torch.ones(3, dtype=torch.float64))


def numpy_divergence(log_t, log_q, kind, b=0.5):
    t, q = np.exp(log_t), np.exp(log_q)
    if kind == "kl":
        return (t * (log_t - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (q * (log_q - log_t)).sum(-1)
    if kind == "js":
        m = b * t + (1 - b) * q
        return b * (t * np.log(t / m)).sum(-1) + (1 - b) * (q * np.log(q / m)).sum(-1)
    if kind == "mse":
        e = (log_q - log_q.mean(-1, keepdims=True)) - (log_t - log_t.mean(-1, keepdims=True))
        return (e * e).mean(-1)
    return 0.5 * np.abs(t - q).sum(-1)


@pytest.mark.parametrize("b", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalised_jsd_matches_numpy_and_its_end_points_are_the_kls(b):
    """jsd_beta = 0 is forward KL(t||q), 1 reverse KL(q||t) (as in TRL's GKD), 1/2 the JS divergence."""
    g = torch.Generator().manual_seed(8)
    log_t = torch.log_softmax(torch.randn(20, 9, generator=g, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.randn(20, 9, generator=g, dtype=torch.float64), -1)
    got = reference.divergence(log_t, log_q, "js", jsd_beta=b).numpy()
    want = {0.0: numpy_divergence(log_t.numpy(), log_q.numpy(), "kl"),
            1.0: numpy_divergence(log_t.numpy(), log_q.numpy(), "reverse_kl")}.get(
        b, numpy_divergence(log_t.numpy(), log_q.numpy(), "js", b))
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("kind", reference.DIVERGENCES)
def test_divergences_match_numpy(kind):
    g = torch.Generator().manual_seed(7)
    log_t = torch.log_softmax(torch.randn(20, 9, generator=g, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.randn(20, 9, generator=g, dtype=torch.float64), -1)
    got = reference.divergence(log_t, log_q, kind).numpy()
    np.testing.assert_allclose(got, numpy_divergence(log_t.numpy(), log_q.numpy(), kind), rtol=1e-12)
    assert (got >= -1e-15).all()
    torch.testing.assert_close(
        reference.divergence(log_t, log_t, kind), torch.zeros(20, dtype=torch.float64), atol=1e-14, rtol=0
    )


@pytest.mark.parametrize("kind", reference.DIVERGENCES)
def test_loss_gradcheck(kind):
    g = torch.Generator().manual_seed(8)
    s = torch.randn(6, 2 * 3, generator=g, dtype=torch.float64, requires_grad=True)
    log_t = torch.log_softmax(torch.randn(6, 6, generator=g, dtype=torch.float64), -1)
    y = torch.tensor([0, 1, 1, -100, 0, 1])

    def fn(x):
        return reference.distillation_loss(
            x, log_t, y, num_classes=2, n_subclasses=3, divergence_kind=kind, tau=1.7, alpha=0.3
        )

    assert torch.autograd.gradcheck(fn, (s,))


def test_loss_formula_and_reductions():
    g = torch.Generator().manual_seed(9)
    s = torch.randn(5, 4, generator=g, dtype=torch.float64)
    log_t = torch.log_softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), -1)
    y = torch.tensor([0, 1, -100, 1, 0])
    tau, alpha = 2.0, 0.5
    per_row = reference.distillation_loss(
        s, log_t, y, num_classes=2, n_subclasses=2, tau=tau, alpha=alpha, reduction="none"
    ).numpy()
    log_q = np_log_softmax(s.numpy() / tau, axis=1)
    kl = (np.exp(log_t.numpy()) * (log_t.numpy() - log_q)).sum(1)
    pooled = np.log(np.exp(s.numpy().reshape(5, 2, 2)).sum(-1))
    ce = -np_log_softmax(pooled, axis=1)[np.arange(5), np.clip(y.numpy(), 0, None)]
    want = np.where(y.numpy() == -100, 0.0, tau**2 * kl + alpha * ce)
    np.testing.assert_allclose(per_row, want, rtol=1e-12)
    total = reference.distillation_loss(s, log_t, y, num_classes=2, n_subclasses=2, tau=tau, alpha=alpha, reduction="sum")
    mean = reference.distillation_loss(s, log_t, y, num_classes=2, n_subclasses=2, tau=tau, alpha=alpha)
    np.testing.assert_allclose(float(total), want.sum(), rtol=1e-12)
    np.testing.assert_allclose(float(mean), want.sum() / 4, rtol=1e-12)


def test_all_rows_ignored_gives_zero_loss_and_grad():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    log_t = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    y = torch.full((3,), -100)
    loss = reference.distillation_loss(s, log_t, y, num_classes=2, n_subclasses=2, alpha=1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("kind", reference.DIVERGENCES)
def test_huge_logits_and_tiny_beta_stay_finite(kind):
    u = torch.tensor([[1e4, -1e4, 3.0, -2.0]], dtype=torch.float64)
    z = torch.tensor([[1e4, -1e4]], dtype=torch.float64)
    log_t = reference.log_targets(u, z, 2, beta=0.01, tau=1.0)
    assert torch.isfinite(log_t).all()
    s = torch.tensor([[-1e4, 1e4, 0.0, 5.0]], dtype=torch.float64, requires_grad=True)
    loss = reference.distillation_loss(s, log_t, None, num_classes=2, n_subclasses=2, divergence_kind=kind)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_class_logits_pools_by_logsumexp():
    s = torch.randn(4, 6, dtype=torch.float64)
    pooled = reference.class_logits(s, 3, 2)
    torch.testing.assert_close(pooled[:, 1], torch.logaddexp(s[:, 2], s[:, 3]))


@pytest.mark.parametrize("kind", reference.DIVERGENCES)
def test_targets_with_exact_zeros_follow_0_log_0_convention(kind):
    """A one-hot target (log t = -inf) gives a finite loss and gradient: 0 · log 0 = 0."""
    log_t = torch.tensor([[0.0, -float("inf"), -float("inf")]], dtype=torch.float64)
    s = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(s, -1)
    d = reference.divergence(log_t, log_q, kind)
    d.sum().backward()
    if kind == "reverse_kl":  # KL(q || t) is infinite where t = 0 < q: correctly so
        assert torch.isinf(d).all()
    elif kind == "mse":  # logits of a zero probability are -inf: not finite (the ops refuse such rows on CPU)
        assert not torch.isfinite(d).any()
    else:
        assert torch.isfinite(d).all() and torch.isfinite(s.grad).all()
    if kind == "kl":
        torch.testing.assert_close(d, -log_q[:, 0])  # KL to a one-hot target is the cross-entropy


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_kl_splits_exactly_into_class_and_subclass_parts(tau):
    """λ = 1 is KL(t‖q) itself, λ = 0 the KL of the class marginals; the loss is affine in λ."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(11, 12, generator=g, dtype=torch.float64) * 3
    log_t = torch.log_softmax(torch.randn(11, 12, generator=g, dtype=torch.float64) * 3, -1)
    full = tau * tau * reference.divergence(log_t, torch.log_softmax(s / tau, -1), "kl")
    torch.testing.assert_close(reference.subclass_weighted_kl(s, log_t, 3, 4, tau, 1.0), full, atol=1e-12, rtol=1e-12)
    log_p = torch.logsumexp(log_t.view(11, 3, 4), -1)
    log_big_q = torch.log_softmax(torch.logsumexp(s.view(11, 3, 4) / tau, -1), -1)
    class_kl = tau * tau * reference.divergence(log_p, log_big_q, "kl")
    torch.testing.assert_close(reference.subclass_weighted_kl(s, log_t, 3, 4, tau, 0.0), class_kl, atol=1e-12,
                               rtol=1e-12)
    mid = reference.subclass_weighted_kl(s, log_t, 3, 4, tau, 0.25)
    torch.testing.assert_close(mid, 0.75 * class_kl + 0.25 * full, atol=1e-12, rtol=1e-12)
    assert bool((full >= class_kl - 1e-12).all())  # the subclass part is a KL: never negative
