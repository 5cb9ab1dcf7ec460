import numpy as np
import pytest
import torch

from lelp_fast import agreement, class_logits, predictive_kl


def test_agreement_counts_matching_argmax():
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 1.0], [0.0, 1.0]])
    assert agreement(t, s) == 0.75


def test_agreement_pools_subclass_outputs():
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    s = torch.tensor([[0.0, 0.0, 5.0, -9.0], [3.0, -9.0, 0.0, 0.0]])  # C=2, S=2
    assert agreement(t, s) == 1.0
    assert predictive_kl(t, s) == pytest.approx(predictive_kl(t, class_logits(s, 2, 2)))


def test_predictive_kl_matches_numpy():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(30, 4, generator=g)
    s = torch.randn(30, 4, generator=g)
    p = np.exp(t.double().numpy()); p /= p.sum(1, keepdims=True)
    q = np.exp(s.double().numpy()); q /= q.sum(1, keepdims=True)
    assert predictive_kl(t, s) == pytest.approx(float((p * np.log(p / q)).sum(1).mean()), rel=1e-9)
    assert predictive_kl(t, t) == pytest.approx(0.0, abs=1e-12)


def test_metric_shape_errors():
    with pytest.raises(ValueError, match="same number of rows"):
        agreement(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="not a multiple"):
        predictive_kl(torch.zeros(3, 2), torch.zeros(3, 5))


def test_pooling_at_the_loss_tau_follows_the_trained_distribution():
    """logsumexp(s) can pick another class than the softmax(s/τ) the loss trained (issue 15)."""
    import torch

    from lelp_fast import LELPLoss, agreement, class_logits

    s = torch.tensor([[3.0, -10.0, 2.0, 2.0]])  # class 0: one strong subclass; class 1: two medium ones
    assert class_logits(s, 2, 2).argmax(1).item() == 0
    trained = torch.softmax(s / 4.0, 1).reshape(1, 2, 2).sum(-1)  # the class marginals the loss trains at τ = 4
    assert trained.argmax(1).item() == 1
    pooled = class_logits(s, 2, 2, tau=4.0)
    assert pooled.argmax(1).item() == 1
    torch.testing.assert_close(torch.softmax(pooled / 4.0, 1), trained)
    torch.testing.assert_close(class_logits(s, 2, 2, tau=1.0), torch.logsumexp(s.reshape(1, 2, 2), -1))
    teacher = torch.tensor([[0.0, 1.0]])
    assert agreement(teacher, s, tau=4.0) == 1.0 and agreement(teacher, s) == 0.0
    assert LELPLoss(num_classes=2, n_subclasses=2, tau=4.0).class_logits(s).argmax(1).item() == 1


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_a_temperature_that_is_not_a_positive_number_is_refused(tau):
    """τ ≤ 0 or NaN pooled silently: at τ = -1 ``τ·logsumexp(s/τ)`` is a soft *min*, and the metrics
    passed such a τ on unread where the student has one output a class."""
    s = torch.tensor([[0.0, 0.0, 5.0, -9.0], [3.0, -9.0, 0.0, 0.0]])  # C=2, S=2
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="tau must be a positive finite number"):
        class_logits(s, 2, 2, tau=tau)
    for metric in (agreement, predictive_kl):
        for student in (s, t):
            with pytest.raises(ValueError, match="tau must be a positive finite number"):
                metric(t, student, tau=tau)


def test_a_tensor_temperature_is_refused_saying_so():
    """A 0-d tensor τ was taken by the loss (synchronising a GPU for float(τ)) and refused by
    LELPLoss; each check now says to pass a number."""
    s = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"tau must be a positive finite number \(a Python or numpy number, not a "
                                         r"tensor: pass float\(t\)\), got tensor\(2\.\)"):
        class_logits(s, 2, 2, tau=torch.tensor(2.0))
    assert class_logits(s, 2, 2, tau=np.float32(2.0)).shape == (2, 2)


def test_agreement_of_rows_with_nan_logits_is_nan_as_the_kl_is():
    """A teacher (or student) row of NaN logits was counted by argmax, which takes NaN for the
    largest: agreement 0.375 without a word, where predictive_kl gave NaN (a session-64 walkthrough)."""
    t = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    s = t.clone()
    assert agreement(t, s) == 1.0
    for bad in (t, s):
        bad[2, 1] = float("nan")
        assert np.isnan(agreement(t, s)) and np.isnan(predictive_kl(t, s))
        bad[2, 1] = 0.0


def test_predictive_kl_of_a_teacher_ruling_a_class_out():
    """A teacher logit of -inf (p = 0) gave NaN: 0 · log 0 is taken as 0 (a session-66 audit)."""
    t = torch.tensor([[2.0, -float("inf"), 0.5]])
    s = torch.tensor([[1.0, 0.0, -1.0]])
    want = predictive_kl(torch.tensor([[2.0, -1e30, 0.5]]), s)
    assert predictive_kl(t, s) == pytest.approx(want) and want > 0
