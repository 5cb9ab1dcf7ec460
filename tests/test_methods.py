"""Distillation methods against hand-written references on small inputs."""

import pytest
import torch
import torch.nn.functional as F

from lelp_fast import reference
from lelp_fast.methods import (AnnealingKD, InstanceTeacherWeights, KDLoss, KMeansSubclasses,
                               RandomProjectionSubclasses, ReinforcedTeacherSelector, fixed_weights, kd_log_targets,
                               oracle_coordinates, subclass_log_targets, uniform_weights)
from lelp_fast.methods.multi_teacher import per_row_ce
from lelp_fast.ops import distill_loss


def test_kd_loss_is_hintons_formula():
    g = torch.Generator().manual_seed(0)
    z, s = torch.randn(37, 3, generator=g) * 3, torch.randn(37, 3, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (37,), generator=g)
    loss = KDLoss(3, tau=2.5, alpha=0.3)(s, z, y)
    p, log_q = torch.softmax(z / 2.5, 1), torch.log_softmax(s / 2.5, 1)
    want = 2.5**2 * (p * (p.log() - log_q)).sum(1).mean() + 0.3 * F.cross_entropy(s, y)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
def test_kd_divergences_match_the_reference(divergence):
    g = torch.Generator().manual_seed(1)
    z, s = torch.randn(20, 2, generator=g), torch.randn(20, 2, generator=g)
    got = KDLoss(2, divergence=divergence, tau=1.5)(s, z)
    want = reference.distillation_loss(s.double(), kd_log_targets(z.double(), 1.5), num_classes=2, n_subclasses=1,
                                       divergence_kind=divergence, tau=1.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="tau must be positive"):
        kd_log_targets(z, 0.0)


def test_annealing_schedule_steps_the_temperature_down_then_hard_labels():
    sched = AnnealingKD(tau_max=4, stage1_epochs=8)
    assert [sched.temperature(e) for e in range(8)] == [4, 4, 3, 3, 2, 2, 1, 1]
    assert [sched.phi(e) for e in range(0, 8, 2)] == [0.25, 0.5, 0.75, 1.0]
    s, z, y = torch.randn(5, 2), torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    torch.testing.assert_close(sched.loss(2, s, z, y), ((s - 0.5 * z) ** 2).mean())
    assert sched.stage(8) == 2
    torch.testing.assert_close(sched.loss(8, s, z, y), F.cross_entropy(s, y))
    for bad in (0.5, float("inf")):  # inf: accepted, then temperature() overflowed (a session-66 audit)
        with pytest.raises(ValueError, match="tau_max must be a finite number >= 1"):
            AnnealingKD(tau_max=bad)


def test_fixed_and_uniform_weights():
    torch.testing.assert_close(uniform_weights(3, 4), torch.full((3, 4), 0.25))
    with pytest.raises(ValueError, match="finite non-negative"):  # gave NaN weights (a session-66 audit)
        fixed_weights([float("inf"), 1.0], 2)
    torch.testing.assert_close(fixed_weights([1, 3], 2), torch.tensor([[0.25, 0.75], [0.25, 0.75]]))
    with pytest.raises(ValueError, match="non-negative"):
        fixed_weights([1, -1], 2)


def test_instance_weights_mix_like_the_fused_kernel_and_get_gradients():
    g = torch.Generator().manual_seed(2)
    feats, s = torch.randn(9, 6, generator=g), torch.randn(9, 4, generator=g)
    log_t = torch.log_softmax(torch.randn(9, 3, 4, generator=g), -1)
    weigher = InstanceTeacherWeights(6, 3, latent_dim=5)
    w = weigher(feats)
    torch.testing.assert_close(w.sum(1), torch.ones(9))
    loss = InstanceTeacherWeights.mixture_loss(s, log_t, w, num_classes=2, n_subclasses=2, tau=1.3)
    fused = distill_loss(s, log_t, num_classes=2, n_subclasses=2, tau=1.3, teacher_weights=w.detach())
    torch.testing.assert_close(loss, fused, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert weigher.latents.grad.abs().sum() > 0 and weigher.project.weight.grad.abs().sum() > 0


def test_reinforced_selection_learns_to_prefer_the_good_teacher():
    g = torch.Generator().manual_seed(3)
    n, d = 1024, 5
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, generator=g) > 0).long()
    noise = torch.randint(0, 2, (n,), generator=g)  # the bad teacher's labels: random
    teacher_logits = torch.stack([F.one_hot(y, 2).float() * 6 - 3, F.one_hot(noise, 2).float() * 6 - 3], 1)
    torch.manual_seed(3)
    student = torch.nn.Linear(d, 2)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    selector = ReinforcedTeacherSelector(d, 2, 2, lr=0.05, seed=3)
    log_t = torch.log_softmax(teacher_logits, -1)
    for step in range(300):
        rows = torch.randint(0, n, (64,), generator=g)
        states = selector.states(x[rows], teacher_logits[rows], y[rows])
        actions, weights = selector.select(states)
        with torch.no_grad():
            before = per_row_ce(student(x[rows]), y[rows], 2)
        opt.zero_grad()
        distill_loss(student(x[rows]), log_t[rows], num_classes=2, n_subclasses=1, teacher_weights=weights).backward()
        opt.step()
        with torch.no_grad():
            after = per_row_ce(student(x[rows]), y[rows], 2)
        selector.update(states, actions, before - after)  # reward: the student's improvement
    with torch.no_grad():
        p = selector.probabilities(selector.states(x, teacher_logits, y)).mean(0)
    assert p[0] > p[1] + 0.3, p


def test_random_projection_coordinates_are_standardised_per_class():
    g = torch.Generator().manual_seed(4)
    h, y = torch.randn(300, 7, generator=g) * 3 + 1, torch.randint(0, 2, (300,), generator=g)
    rp = RandomProjectionSubclasses(3, seed=1).fit(h, y, 2)
    u = rp.project(h)
    for c in range(2):
        q = rp.directions[c]
        torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64))
        uc = u[y == c][:, 3 * c:3 * c + 3].double()
        torch.testing.assert_close(uc.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(uc.std(0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="class 1 has 2 rows, fewer than n_subclasses=3"):
        RandomProjectionSubclasses(3).fit(h[:10], torch.tensor([0] * 8 + [1] * 2), 2)


def test_kmeans_subclasses_recover_separated_clusters():
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(2, 3, 8, generator=g) * 10
    sub = torch.randint(0, 3, (600,), generator=g)
    y = torch.randint(0, 2, (600,), generator=g)
    h = centers[y, sub] + torch.randn(600, 8, generator=g) * 0.3
    km = KMeansSubclasses(3, seed=0).fit(h, y, 2)
    u = km.project(h)
    want = -torch.cdist(h.double(), km.centroids[1]).pow(2) / (2 * km.sigma2[1])
    torch.testing.assert_close(u[:, 3:].double(), want, atol=1e-3, rtol=1e-4)
    for c in range(2):
        found = u[y == c][:, 3 * c:3 * c + 3].argmax(1)
        true = sub[y == c]
        for s in range(3):  # every true subclass lands in one cluster
            assert torch.bincount(found[true == s], minlength=3).max() == (true == s).sum()


def test_oracle_targets_put_the_class_mass_on_the_true_subclass():
    y, sub = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])
    u = oracle_coordinates(sub, y, 2, 3)
    z = torch.tensor([[2.0, -2.0], [0.0, 1.0], [0.0, 1.0]])
    t = subclass_log_targets(u, z, 3, beta=0.5).exp()
    p = torch.softmax(z, 1)
    assert t[0, 2] > 0.999 * p[0, 0] and t[1, 3] > 0.999 * p[1, 1] and t[2, 4] > 0.999 * p[2, 1]
    torch.testing.assert_close(t.reshape(3, 2, 3).sum(-1), p)
    with pytest.raises(ValueError, match="subclass_ids must be in"):
        oracle_coordinates(torch.tensor([3, 0, 0]), y, 2, 3)


def test_annealing_with_fewer_epochs_than_steps_still_ends_at_t_1():
    """tau_max = 4 over 3 stage-I epochs gave 4, 3, 2: the student never saw T = 1 before stage II."""
    assert [AnnealingKD(tau_max=4, stage1_epochs=3).temperature(e) for e in range(3)] == [4, 3, 1]
    assert [AnnealingKD(tau_max=4, stage1_epochs=4).temperature(e) for e in range(4)] == [4, 3, 2, 1]


def test_a_weighting_network_trained_through_the_fused_loss_is_refused():
    """teacher_weights that require a gradient got none through LELPLoss / distill_loss, on every
    backend, silently (a session-65 walkthrough): an AMTML weigher trained so never learned."""
    from lelp_fast import LELPLoss

    g = torch.Generator().manual_seed(4)
    log_t = torch.log_softmax(torch.randn(16, 3, 8, generator=g), -1)
    weigher = InstanceTeacherWeights(5, 3)
    w = weigher(torch.randn(16, 5, generator=g))
    s = torch.randn(16, 8, generator=g, requires_grad=True)
    for backend in ("torch", "cpu", "auto"):
        with pytest.raises(ValueError, match=r"teacher_weights require a gradient.*InstanceTeacherWeights.mixture_loss"):
            LELPLoss(num_classes=2, n_subclasses=4, backend=backend)(s, log_t, teacher_weights=w)
    LELPLoss(num_classes=2, n_subclasses=4)(s, log_t, teacher_weights=w.detach()).backward()
    grads = torch.autograd.grad(InstanceTeacherWeights.mixture_loss(s, log_t, weigher(torch.randn(16, 5)),
                                                                    num_classes=2, n_subclasses=4),
                                list(weigher.parameters()))
    assert all(gr is not None and bool(gr.abs().sum() > 0) for gr in grads)


def test_the_selectors_states_take_rows_without_a_label():
    """-100 (the loss's ignore_index) indexed out of bounds in the teacher CE of the state."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 2, 3, generator=g)
    labels = torch.tensor([0, -100, 2, 1])
    states = ReinforcedTeacherSelector.states(torch.randn(4, 6, generator=g), logits, labels)
    assert states.shape == (4, 2, 6 + 3 + 1) and bool((states[1, :, -1] == 0).all())
    want = -torch.log_softmax(logits[2], -1)[:, 2]
    torch.testing.assert_close(states[2, :, -1], want)
    logits[1, :, 0] = float("-inf")  # the unlabelled row's gathered class: 0, not inf * 0 = NaN
    assert torch.isfinite(ReinforcedTeacherSelector.states(torch.randn(4, 6), logits, labels)).all()


def test_the_mixture_loss_takes_the_subclass_weight_of_lelp_loss():
    """mixture_loss trained at λ = 1 only, while LELPLoss's default is 0.1 (a session-65 walkthrough)."""
    from lelp_fast import LELPLoss

    g = torch.Generator().manual_seed(7)
    log_t = torch.log_softmax(torch.randn(12, 3, 8, generator=g), -1)
    weigher = InstanceTeacherWeights(5, 3)
    w = weigher(torch.randn(12, 5, generator=g))
    s = torch.randn(12, 8, generator=g)
    got = InstanceTeacherWeights.mixture_loss(s, log_t, w, num_classes=2, n_subclasses=4, subclass_weight=0.1)
    want = LELPLoss(num_classes=2, n_subclasses=4, subclass_weight=0.1)(s, log_t, teacher_weights=w.detach())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got, list(weigher.parameters()))
    assert all(bool(gr.abs().sum() > 0) for gr in grads)


def test_kd_targets_at_a_tiny_tau_do_not_overflow():
    """z / τ overflowed before the log-softmax: z = 1e33 at τ = 1e-6 gave NaN targets (a session-66
    audit). Shifted by the row's max first at τ < 1, as the loss takes the student's."""
    got = kd_log_targets(torch.tensor([[1e33, 0.0], [1.0, 2.0]]), 1e-6)
    assert got[0, 0] == 0 and got[0, 1] == -float("inf")
    torch.testing.assert_close(kd_log_targets(torch.tensor([[1.0, 2.0]]), 0.5),
                               torch.log_softmax(torch.tensor([[2.0, 4.0]]), -1))
