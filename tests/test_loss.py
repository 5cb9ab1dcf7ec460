"""LELPLoss: offline and online modes against the reference, autograd, bad input."""

import pytest
import torch

from lelp_fast import LELPLoss, LELPProjector, reference
from conftest import make_problem


@pytest.fixture(scope="module")
def fitted():
    h, w, b, y = make_problem(n=300, d=16, num_classes=2, seed=31)
    return LELPProjector(3, beta=0.6, tau=1.4).fit(h, y, head_weight=w, head_bias=b), h, y


@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_offline_loss_matches_reference(fitted, divergence, reduction):
    proj, h, y = fitted
    log_t = proj.targets(h[:40].float())
    s = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    labels = y[:40].clone()
    labels[3] = -100
    loss = LELPLoss(proj, divergence=divergence, alpha=0.25, reduction=reduction, subclass_weight=1.0)(s, log_t, labels)
    want = reference.distillation_loss(
        s.detach(), log_t.double(), labels, num_classes=2, n_subclasses=3, divergence_kind=divergence,
        tau=1.4, alpha=0.25, reduction=reduction,
    )
    torch.testing.assert_close(loss.detach(), want)


@pytest.mark.parametrize("weight", [None, 1.0, 0.0])
def test_online_equals_offline(fitted, weight):
    """At the default λ (and any λ ≠ 1) the online targets are computed in torch before the two fused
    calls; at λ = 1 in the kernel. Either way they are the offline targets' loss."""
    proj, h, y = fitted
    emb = h[:25].float()
    s = torch.randn(25, 6, requires_grad=True)
    online = LELPLoss(proj, subclass_weight=weight)(s, embeddings=emb)
    offline = LELPLoss(proj, subclass_weight=weight)(s, proj.targets(emb))
    torch.testing.assert_close(online, offline)
    online.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("weight", [None, 1.0])
def test_online_several_projectors_equals_offline_mixture(fitted, weight):
    proj, h, y = fitted
    h2, w2, b2, _ = make_problem(n=300, d=9, num_classes=2, seed=32)
    proj2 = LELPProjector(3, beta=0.3).fit(h2, y, head_weight=w2, head_bias=b2)
    weights = torch.softmax(torch.randn(25, 2), 1)
    s = torch.randn(25, 6, requires_grad=True)
    module = LELPLoss([proj, proj2], tau=1.4, alpha=0.1, subclass_weight=weight)
    online = module(s, None, y[:25], embeddings=[h[:25].float(), h2[:25].float()], teacher_weights=weights)
    stacked = torch.stack([proj.targets(h[:25].float()), proj2.targets(h2[:25].float(), tau=1.4)], 1)
    offline = LELPLoss(num_classes=2, n_subclasses=3, tau=1.4, alpha=0.1, subclass_weight=weight)(
        s, stacked, y[:25], teacher_weights=weights)
    torch.testing.assert_close(online, offline)
    mixed = reference.mix_log_targets(stacked.double(), weights.double())
    want = (reference.subclass_weighted_kl(s.detach().double(), mixed, 2, 3, 1.4, module.subclass_weight)
            + 0.1 * reference.hard_label_rows(s.detach().double(), y[:25], 2, 3)).mean()
    torch.testing.assert_close(online.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="embeddings must be a list of 2 tensors"):
        module(s, embeddings=h[:25].float(), teacher_weights=weights)
    with pytest.raises(ValueError, match=r"embeddings\[1\] must have shape \(N, 9\)"):
        module(s, embeddings=[h[:25].float(), h[:25].float()], teacher_weights=weights)
    other = LELPProjector(2).fit(h2, y)
    with pytest.raises(ValueError, match=r"projector\[1\] has C=2, S=2"):
        LELPLoss([proj, other])


@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
def test_module_gradcheck_fp64(fitted, divergence):
    proj, h, y = fitted
    log_t = proj.targets(h[:5].double(), out_dtype=torch.float64, backend="torch")
    module = LELPLoss(proj, divergence=divergence, alpha=0.5)
    s = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: module(x, log_t, y[:5]), (s,))


def test_the_default_subclass_weight_is_the_reference_at_0_1_and_1_is_the_papers_loss(fitted):
    """Issue 22: LELPLoss trains τ²[KL(p‖Q) + λ Σ_c p_c KL(r_c‖ρ_c)] at λ = 0.1 unless told; λ = 1 is
    the paper's KL(t‖q), the single fused pass."""
    proj, h, y = fitted
    log_t = proj.targets(h[:40].float())
    s = torch.randn(40, 6, dtype=torch.float64)
    default = LELPLoss(proj)
    assert default.subclass_weight == reference.DEFAULT_SUBCLASS_WEIGHT == 0.1
    want = reference.subclass_weighted_kl(s, log_t.double(), 2, 3, 1.4, 0.1).mean()
    torch.testing.assert_close(default(s, log_t).double(), want, atol=1e-6, rtol=1e-6)
    paper = reference.distillation_loss(s, log_t.double(), num_classes=2, n_subclasses=3, tau=1.4)
    torch.testing.assert_close(LELPLoss(proj, subclass_weight=1.0)(s, log_t).double(), paper, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="subclass_weight needs divergence='kl'"):
        LELPLoss(proj, divergence="js", subclass_weight=0.5)
    with pytest.raises(ValueError, match="subclass_weight must be >= 0"):
        LELPLoss(proj, subclass_weight=-0.1)


@pytest.mark.parametrize("weight", [None, 0.1, 0.0, 1.0])
def test_s1_is_vanilla_kd_exactly_whatever_the_subclass_weight(weight):
    """With one subclass per class there is no subclass part: λ changes nothing, bit for bit."""
    z = torch.randn(30, 3)
    s = torch.randn(30, 3, requires_grad=True)
    log_t = torch.log_softmax(z / 2.0, -1)
    plain = LELPLoss(num_classes=3, n_subclasses=1, tau=2.0, subclass_weight=1.0)(s, log_t)
    loss = LELPLoss(num_classes=3, n_subclasses=1, tau=2.0, subclass_weight=weight)(s, log_t)
    assert torch.equal(loss, plain)
    (g1,) = torch.autograd.grad(plain, s)
    (g2,) = torch.autograd.grad(LELPLoss(num_classes=3, n_subclasses=1, tau=2.0, subclass_weight=weight)(s, log_t), s)
    assert torch.equal(g1, g2)


def test_offline_without_projector_is_vanilla_kd_at_s1():
    z = torch.randn(8, 3, dtype=torch.float64)
    s = torch.randn(8, 3, dtype=torch.float64)
    loss = LELPLoss(num_classes=3, n_subclasses=1, tau=2.0)(s, torch.log_softmax(z / 2.0, -1))
    p = torch.softmax(z / 2.0, -1)
    want = 4.0 * (p * (p.log() - torch.log_softmax(s / 2.0, -1))).sum(1).mean()
    torch.testing.assert_close(loss, want)


def test_bad_input(fitted):
    proj, h, y = fitted
    with pytest.raises(ValueError, match="divergence must be one of"):
        LELPLoss(proj, divergence="hellinger")
    with pytest.raises(ValueError, match="reduction must be one of"):
        LELPLoss(proj, reduction="batchmean")
    with pytest.raises(ValueError, match="num_classes and n_subclasses"):
        LELPLoss()
    loss = LELPLoss(proj)
    with pytest.raises(ValueError, match=r"student_logits must have shape \(N, 6\)"):
        loss(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="targets shape"):
        loss(torch.randn(4, 6), torch.randn(3, 6))
    with pytest.raises(ValueError, match="labels are required when alpha"):
        LELPLoss(proj, alpha=1.0)(torch.randn(4, 6), torch.log_softmax(torch.randn(4, 6), -1))
    with pytest.raises(ValueError, match="pass targets"):
        LELPLoss(num_classes=2, n_subclasses=3)(torch.randn(4, 6))


# ---- issue 20: wrong arguments are named when they are given -------------------------------------

def test_loss_arguments_are_checked_at_construction_and_misuse_is_named():
    from lelp_fast import class_logits

    with pytest.raises(ValueError, match="alpha must be a finite number >= 0, got nan"):
        LELPLoss(num_classes=2, n_subclasses=2, alpha=float("nan"))
    with pytest.raises(ValueError, match="backend must be one of"):
        LELPLoss(num_classes=2, n_subclasses=2, backend="gpu")
    loss = LELPLoss(num_classes=2, n_subclasses=2)
    s = torch.randn(5, 4)
    probabilities = torch.softmax(torch.randn(5, 4), 1)
    with pytest.raises(ValueError, match="log_targets row 0 holds .* > 0: .*were probabilities passed"):
        loss(s, probabilities)
    assert torch.isfinite(loss(s, probabilities.log()))
    with pytest.raises(ValueError, match="student_logits have 4 outputs, but num_classes=2 x n_subclasses=3 = 6"):
        class_logits(s, 2, 3)


def test_loss_module_check_inputs_switch():
    """Issue 21 item 13: LELPLoss(check_inputs=False) skips the input check, as distill_loss does."""
    s = torch.randn(6, 4)
    log_t = torch.log_softmax(torch.randn(6, 4), 1)
    log_t[3, 1] = float("nan")
    with pytest.raises(ValueError, match="log_targets row 3 contains NaN"):
        LELPLoss(num_classes=2, n_subclasses=2)(s, log_t)
    per_row = LELPLoss(num_classes=2, n_subclasses=2, reduction="none", check_inputs=False)(s, log_t)
    assert torch.isnan(per_row[3]) and torch.isfinite(per_row[[0, 1, 2, 4, 5]]).all()


def test_the_headless_online_loss_says_to_pass_teacher_logits_to_the_loss():
    h, w, b, y = make_problem(n=200, d=12, num_classes=2, seed=3)
    headless = LELPProjector(2).fit(h, y)
    with pytest.raises(ValueError, match="pass teacher_logits \\(to targets\\(\\), or to the loss with the embeddings\\)"):
        LELPLoss(headless)(torch.randn(4, 4), embeddings=h[:4].float())


def test_jsd_is_accepted_as_js_by_the_module_and_kd(fitted):
    from lelp_fast.methods.kd import KDLoss

    proj, h, y = fitted
    log_t = proj.targets(h[:40].float())
    s = torch.randn(40, 6, dtype=torch.float64)
    loss = LELPLoss(proj, divergence="jsd", jsd_beta=0.25)
    assert loss.divergence == "js"
    want = reference.distillation_loss(s, log_t.double(), num_classes=2, n_subclasses=3, divergence_kind="js",
                                       jsd_beta=0.25, tau=1.4)
    torch.testing.assert_close(loss(s, log_t), want)
    z = torch.randn(40, 2, dtype=torch.float64)
    kd = KDLoss(2, divergence="jsd", tau=2.0)(s[:, :2], z)
    torch.testing.assert_close(kd, KDLoss(2, divergence="js", tau=2.0)(s[:, :2], z))
    with pytest.raises(ValueError, match="divergence must be one of"):
        LELPLoss(proj, divergence="JSD")


def test_a_class_or_subclass_count_that_contradicts_the_projector_is_refused(fitted):
    """LELPLoss(projector, n_subclasses=3) with a projector of S = 4 was built as asked, and failed at
    the first online call on an internal shape ("fused_weight[0]/fused_bias[0] must have shapes"); an
    offline call trained C x S of the caller's against targets of the projector's (a session-64
    walkthrough). Counts that agree with the projector are taken."""
    proj = fitted[0]  # C = 2, S = 3
    for kw in (dict(n_subclasses=4), dict(num_classes=3), dict(num_classes=1, n_subclasses=6)):
        with pytest.raises(ValueError, match=r"the projector has C=2, S=3; drop num_classes/n_subclasses or pass "
                                             r"those"):
            LELPLoss(proj, **kw)
    loss = LELPLoss(proj, num_classes=2, n_subclasses=3)
    assert (loss.num_classes, loss.n_subclasses) == (2, 3)
