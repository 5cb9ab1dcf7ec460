"""Issue 22's LELP variants (lelp_fast.methods.subclass_variants) against direct fp64 computations.

The fits and maps are fp64 on both sides, so their tolerance is fp64 round-off over a few dozen
operations: 1e-9. The last test runs each map through the library's fp32 ops on every backend
(tolerances as in tests/test_ops_targets.py and tests/test_ops_loss.py).
"""

import math

import numpy as np
import pytest
import torch

from lelp_fast import reference
from lelp_fast.methods.subclass_variants import (GMMSubclasses, SpectralSubclasses, SubclassVariant, annealed_beta,
                                                 entropy_matched_betas, gmm_log_posteriors,
                                                 per_class_beta_log_targets, spectral_subclass_counts, split_entropy)

TOL = 1e-9


def _classes(spans, n=400, d=12, seed=0):
    """Rows of len(spans) classes; class c has variance 25, 16, 9, ... along its first spans[c] axes, 0.01 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    hs, ys = [], []
    for c, span in enumerate(spans):
        scale = torch.full((d,), 0.1, dtype=torch.float64)
        scale[:span] = torch.arange(5, 5 - span, -1, dtype=torch.float64)
        hs.append(torch.randn(n, d, generator=g, dtype=torch.float64) * scale + 3 * c)
        ys.append(torch.full((n,), c))
    return torch.cat(hs), torch.cat(ys)


def test_spectral_counts_are_the_fewest_directions_reaching_the_share():
    evals = torch.tensor([[4.0, 3.0, 2.0, 1.0], [10.0, 0.1, 0.1, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # direct: cumulative shares 0.4 0.7 0.9 1 | 0.98 .. | 0.25 0.5 0.75 1; share 0.7
    assert spectral_subclass_counts(evals, 0.7, 8).tolist() == [2, 1, 3]
    assert spectral_subclass_counts(evals, 0.7, 2).tolist() == [2, 1, 2]  # capped by max_subclasses
    assert spectral_subclass_counts(evals, 0.7, 8, rows=torch.tensor([2, 50, 3])).tolist() == [1, 1, 2]  # rows − 1


def test_spectral_coordinates_match_the_reference_fit_and_pad_with_minus_inf():
    h, y = _classes([3, 3])
    w = torch.randn(2, h.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fitted = SpectralSubclasses(max_subclasses=5, share=0.95, seed=7).fit(h, y, 2, head_weight=w)
    assert fitted.subclass_counts.tolist() == [3, 3]
    a, e = reference.fit_reference(h, y, 2, 3, head_weight=w, seed=7)  # the same S for both: the same draws
    u = fitted.project(h).view(-1, 2, 5)
    torch.testing.assert_close(u[..., :3], (h @ a + e).view(-1, 2, 3), rtol=0, atol=TOL)
    assert torch.isneginf(u[..., 3:]).all()
    log_t = reference.log_targets(u.reshape(len(h), -1), torch.zeros(len(h), 2), 5, beta=0.25)
    assert (log_t.view(-1, 2, 5)[..., 3:].exp() == 0).all()  # padded subclasses get no mass
    torch.testing.assert_close(torch.logsumexp(log_t.view(-1, 2, 5), -1), torch.full((len(h), 2), -math.log(2),
                                                                                      dtype=log_t.dtype))


def test_spectral_counts_differ_per_class_and_coordinates_are_standardised():
    h, y = _classes([1, 4])
    fitted = SpectralSubclasses(max_subclasses=6, share=0.95).fit(h, y, 2)
    assert fitted.subclass_counts.tolist() == [1, 4]
    u = fitted.project(h).view(-1, 2, 6)
    for c, s in enumerate((1, 4)):
        var = u[y == c, c, :s].var(0)  # unbiased, as the class covariance is
        torch.testing.assert_close(var, torch.ones(s, dtype=var.dtype), rtol=0, atol=TOL)


def test_gmm_log_posteriors_match_scikit_learn():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(m, 1.0, size=(200, 3)) for m in (-3.0, 0.0, 3.0)])
    gmm = GaussianMixture(3, covariance_type="full", random_state=0).fit(x)
    ours = gmm_log_posteriors(torch.from_numpy(x), *(torch.from_numpy(a) for a in
                                                      (gmm.weights_, gmm.means_, gmm.covariances_)))
    torch.testing.assert_close(ours.exp(), torch.from_numpy(gmm.predict_proba(x)), rtol=0, atol=TOL)


def test_gmm_subclasses_find_separated_clusters_in_whitened_principal_coordinates():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[8.0, 0, 0, 0, 0, 0], [-8.0, 0, 0, 0, 0, 0], [0, 8.0, 0, 0, 0, 0], [0, -8.0, 0, 0, 0, 0]],
                           dtype=torch.float64)
    truth = torch.arange(4).repeat_interleave(100)
    h = torch.cat([centres + 0.0, centres + 20.0])[torch.cat([truth, truth + 4])]
    h = h + torch.randn(h.shape, generator=g, dtype=torch.float64)
    y = torch.arange(2).repeat_interleave(400)
    fitted = GMMSubclasses(4, dims=2, seed=0).fit(h, y, 2)
    u = fitted.project(h).view(-1, 2, 4)
    torch.testing.assert_close(torch.logsumexp(u, -1), torch.zeros(len(h), 2, dtype=u.dtype), rtol=0, atol=TOL)
    for c in range(2):
        assign = u[y == c, c].argmax(1)
        # each true cluster is one component, and the four clusters use four different components
        groups = [set(assign[truth == k].tolist()) for k in range(4)]
        assert all(len(gr) == 1 for gr in groups) and len(set.union(*groups)) == 4


def test_tied_gmm_map_gives_the_mixture_posteriors_and_full_has_none():
    """The tied mixture's affine map, log-softmaxed per class, is its posterior (scikit-learn's
    predict_proba on the same whitened coordinates); a full-covariance mixture has no affine map."""
    h, y = _classes([3, 4], n=300)
    head = torch.randn(2, h.shape[1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fitted = GMMSubclasses(4, seed=1).fit(h, y, 2, head_weight=head)
    u = fitted.subclass_map().project(h).view(-1, 2, 4)
    torch.testing.assert_close(torch.log_softmax(u, -1), fitted.project(h).view(-1, 2, 4), rtol=0, atol=1e-8)
    from sklearn.mixture import GaussianMixture

    a, mean = fitted.coords[1]
    x = ((h @ reference.null_space_projector(head) - mean) @ a).numpy()
    gmm = GaussianMixture(4, covariance_type="tied", random_state=2).fit(x[(y == 1).numpy()])
    torch.testing.assert_close(torch.softmax(u[:, 1], -1), torch.from_numpy(gmm.predict_proba(x)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="quadratic"):
        GMMSubclasses(4, covariance="full").fit(h, y, 2).subclass_map()
    full = SubclassVariant("LELP GMM full", h, y, 2, 4)
    with pytest.raises(ValueError, match="cannot run 'LELP GMM full'"):
        full.targets(h.float(), torch.zeros(len(h), 2), 0, 10, 0.25, backend="cpu")
    torch.testing.assert_close(full.targets(h, torch.zeros(len(h), 2), 0, 10, 0.25, backend="torch"),
                               full.log_targets(full.project(h), torch.zeros(len(h), 2), 0, 10, 0.25))


def test_spectral_map_is_the_spectral_coordinates():
    h, y = _classes([1, 4])
    fitted = SpectralSubclasses(max_subclasses=6, share=0.95, seed=2).fit(h, y, 2)
    u, mapped = fitted.project(h), fitted.subclass_map().project(h)
    assert torch.equal(torch.isneginf(u), torch.isneginf(mapped)) and torch.isneginf(u).sum() == len(h) * 7
    torch.testing.assert_close(mapped[torch.isfinite(u)], u[torch.isfinite(u)], rtol=0, atol=TOL)


def test_entropy_matched_betas_hit_the_target_entropy():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(300, 2 * 4, generator=g, dtype=torch.float64) * torch.tensor([1.0] * 4 + [3.0] * 4)
    y = torch.arange(300) % 2
    betas = entropy_matched_betas(u, y, 2, 4, target=0.35)
    for c in range(2):
        r = torch.softmax(u[y == c].view(-1, 2, 4)[:, c] / betas[c], -1)  # direct: H(softmax(u_c/β_c)) / log S
        entropy = float((-(r * r.log()).sum(-1) / math.log(4)).mean())
        assert abs(entropy - 0.35) < 1e-9
    assert betas[1] > betas[0]  # the class with three times the spread needs a larger β for the same entropy
    with pytest.raises(ValueError, match="target must lie in"):
        entropy_matched_betas(u, y, 2, 4, target=1.0)


def test_per_class_beta_targets_are_each_class_at_its_own_beta():
    g = torch.Generator().manual_seed(0)
    u, z = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    betas = torch.tensor([0.2, 0.7], dtype=torch.float64)
    ours = per_class_beta_log_targets(u, z, 3, betas).view(5, 2, 3)
    for c in range(2):
        direct = reference.log_targets(u, z, 3, beta=float(betas[c])).view(5, 2, 3)[:, c]
        torch.testing.assert_close(ours[:, c], direct, rtol=0, atol=TOL)
    torch.testing.assert_close(split_entropy(u, 3, 0.2)[:, 0], split_entropy(u[:, :3], 3, 0.2)[:, 0], rtol=0, atol=TOL)


def test_annealed_beta_is_geometric_from_start_to_beta_then_constant():
    assert annealed_beta(0, 300, 0.25, start=4.0) == pytest.approx(4.0, rel=1e-12)
    assert annealed_beta(100, 300, 0.25, start=4.0) == pytest.approx(1.0, rel=1e-12)  # halfway: sqrt(4 · 0.25)
    assert annealed_beta(200, 300, 0.25, start=4.0) == pytest.approx(0.25, rel=1e-12)
    assert annealed_beta(299, 300, 0.25, start=4.0) == pytest.approx(0.25, rel=1e-12)


def test_variant_targets_keep_the_teacher_class_probabilities():
    h, y = _classes([2, 3])
    z = torch.randn(len(h), 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for name, outputs in (("LELP spectral S", 6), ("LELP GMM", 3), ("LELP entropy β", 3), ("LELP annealed β", 3),
                          ("LELP GMM full", 3)):
        variant = SubclassVariant(name, h, y, 2, 3)
        assert variant.n_subclasses == outputs
        log_t = variant.log_targets(variant.project(h[:50]), z[:50], step=10, steps=100, beta=0.25).double()
        torch.testing.assert_close(torch.logsumexp(log_t.view(50, 2, -1), -1), torch.log_softmax(z[:50], -1),
                                   rtol=0, atol=1e-5)  # fp32 targets


# -- every variant on every backend: the affine map through the library's ops against the fp64 reference --

from lelp_fast.methods.subclass_variants import VARIANTS, both_signs_map  # noqa: E402
from lelp_fast.ops import distill_loss  # noqa: E402
from test_ops_targets import BACKENDS  # noqa: E402

MAPPED = [v for v in VARIANTS if v != "LELP GMM full"] + ["LELP both signs"]


def _fitted(name, h, y, head):
    """(its map, β at a step, its targets on a backend, its fp64 reference targets), the last three
    as functions of the step."""
    steps, beta, tau = 100, 0.25, 1.5
    if name == "LELP both signs":
        from lelp_fast import LELPProjector

        p = LELPProjector(2, beta=beta, tau=tau, seed=3).fit(h, y, head_weight=head)
        m = both_signs_map(p)

        def signs(hh):  # directly: per class, the projector's two coordinates and their negatives
            u = p.project(hh.double()).view(-1, 2, 2)
            return torch.cat([u, -u], -1).reshape(len(hh), 8)

        return (m, lambda step: beta, lambda hh, z, step, backend: m.targets(hh, z, beta, tau, backend),
                lambda hh, z, step: reference.log_targets(signs(hh), z.double(), 4, beta, tau))
    v = SubclassVariant(name, h, y, 2, 4, head, seed=3)
    return (v.map, lambda step: v.beta_at(step, steps, beta),
            lambda hh, z, step, backend: v.targets(hh, z, step, steps, beta, tau, backend),
            lambda hh, z, step: v.log_targets(v.project(hh), z, step, steps, beta, tau).double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MAPPED)
def test_variant_targets_and_loss_on_every_backend_match_the_reference(backend, name, device="cpu", rtol=1e-5):
    """Each variant's targets from the targets op, and the loss on them offline and online (the map
    inside the loss), at λ = 0.1 and at λ = 1 with the hard-label term (the CPU kernel's lane layout,
    Triton's fused online loss), against the variant's direct fp64 computation; 61 rows.
    tests/test_triton.py runs it on Triton (``device`` "cuda" there on a GPU). ``rtol`` is the
    targets' relative tolerance; the loss's gradient on them (offline and online) is held to an
    absolute 2 · rtol."""
    if backend in ("cuda", "cuda_emu"):
        # the CUDA tile splits fp32 h and the map into bf16 parts, as Triton does (test_triton.py: 3e-5)
        rtol = max(rtol, 3e-5)
    h, y = _classes([3, 5], n=120, d=12)
    head = torch.randn(2, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m, beta_at, ours, ref = _fitted(name, h, y, head)
    rows = torch.arange(1, 240, 3)[:61]
    h32, z32 = h[rows].float(), (h[rows] @ head.T).float()
    for step in (0, 40, 99):
        got = ours(h32.to(device), z32.to(device), step, backend).cpu()
        want = ref(h32.double(), z32.double(), step)
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))
        finite = torch.isfinite(want)
        torch.testing.assert_close(got.double()[finite], want[finite], atol=2e-4, rtol=rtol)

    s = m.n_subclasses
    student = torch.randn(61, 2 * s, generator=torch.Generator().manual_seed(2))
    s64 = student.double().requires_grad_(True)
    online = dict(embeddings=h32.to(device), fused_weight=m.weight.float().to(device),
                  fused_bias=m.bias.float().to(device), teacher_logits=z32.to(device), beta=beta_at(99))
    for weight, alpha in ((0.1, 0.0), (1.0, 0.2)):
        if weight == 1.0:
            want_loss = reference.distillation_loss(s64, want, y[rows], num_classes=2, n_subclasses=s, tau=1.5,
                                                    alpha=alpha, reduction="none")
        else:
            want_loss = reference.subclass_weighted_kl(s64, want, 2, s, 1.5, weight)
        (want_grad,) = torch.autograd.grad(want_loss.sum(), s64)
        x = student.to(device).requires_grad_(True)
        kw = dict(num_classes=2, n_subclasses=s, tau=1.5, subclass_weight=weight, alpha=alpha, reduction="none",
                  backend=backend)
        for targets in (dict(log_targets=got.to(device)), online):
            loss = distill_loss(x, labels=y[rows].to(device), **targets, **kw)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            torch.testing.assert_close(loss.double().cpu(), want_loss.detach(), atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(grad.double().cpu(), want_grad, atol=2 * rtol, rtol=1e-4)
