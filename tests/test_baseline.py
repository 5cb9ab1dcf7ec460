"""The run report's KD baseline: S = 1 targets from the same teacher logits, the same rows,
settings and initialisation seed as the LELP student, and the paired difference on the test rows."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lelp_fast.capture import CaptureSource, capture
from lelp_fast.offline import TargetsDataset
from lelp_fast.train import TrainSettings
from lelp_fast.train.baseline import baseline_markdown, compare_with_kd, kd_baseline

# The stored targets are fp32; log_softmax in fp32 of the same logits differs by rounding only.
TARGETS_ATOL = 1e-6


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, (x[:, 0] + 0.3 * x[:, 1] > 0).long()


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture
def captured(tmp_path):
    x, y = _data(300, 0)
    train = TensorDataset(x, y)
    capture(Teacher(), torch.utils.data.DataLoader(train, batch_size=100), str(tmp_path / "capture"),
            dtype="float32")
    return train, str(tmp_path / "capture")


def test_kd_targets_are_the_softmax_of_the_same_teacher_logits(tmp_path, captured):
    train, capture_dir = captured
    seeds = []

    def make_student(k):
        seeds.append(torch.initial_seed())
        return nn.Linear(3, k)

    settings = TrainSettings(epochs=3, batch_size=64, lr=0.01, seed=7, tensorboard=False)
    out = kd_baseline(make_student, train, capture_dir, str(tmp_path / "kd"), num_classes=2, settings=settings,
                      tau=2.0, val_data=TensorDataset(*_data(100, 1)))
    z = CaptureSource(capture_dir).tensors()["teacher_logits"].float()
    stored = TargetsDataset(str(tmp_path / "kd" / "targets")).targets(list(range(len(train))))
    torch.testing.assert_close(stored.float(), F.log_softmax(z / 2.0, dim=1), atol=TARGETS_ATOL, rtol=0)
    assert seeds == [7]  # the LELP student's initialisation seed
    assert out["n_subclasses"] == 1 and out["epochs_run"] == 3 and out["settings"]["seed"] == 7
    assert out["student"].out_features == 2 and out["targets_tau"] == 2.0


def test_the_baseline_is_kd_trained_by_the_same_loop(tmp_path, captured):
    """Against KD written by hand: the same targets through distill give the same weights."""
    from lelp_fast.train import distill

    train, capture_dir = captured
    settings = TrainSettings(epochs=2, batch_size=64, lr=0.01, seed=3, tensorboard=False)
    lines = []
    out = kd_baseline(lambda k: nn.Linear(3, k), train, capture_dir, str(tmp_path / "kd"), num_classes=2,
                      settings=settings, log=lines.append)
    # its epochs are the baseline's in the log, not the LELP student's "[train]" (a session-64 walkthrough)
    assert [line.split(":")[0] for line in lines] == ["[baseline] epoch 1/2", "[baseline] epoch 2/2"], lines
    torch.manual_seed(3)
    by_hand = nn.Linear(3, 2)
    distill(by_hand, train, str(tmp_path / "kd" / "targets"), str(tmp_path / "by-hand"), num_classes=2,
            n_subclasses=1, settings=settings)
    for a, b in zip(out["student"].state_dict().values(), by_hand.state_dict().values()):
        assert torch.equal(a, b)


class Fixed(nn.Module):
    """Predicts class 1 on the rows in ``ones`` and class 0 elsewhere (row i's input is i)."""

    def __init__(self, ones, k):
        super().__init__()
        self.ones, self.k = set(ones), k

    def forward(self, x):
        hit = torch.tensor([float(int(i) in self.ones) for i in x[:, 0]])
        return torch.stack([1 - hit, hit], 1).repeat_interleave(self.k // 2, 1) * 5.0


def test_the_paired_difference_counts_rows_and_its_interval_is_the_paired_one():
    n = 100
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    y = (torch.arange(n) < 50).long()  # rows 0..49 are class 1
    test = TensorDataset(x, y)
    lelp = Fixed(range(0, 50), 4)  # right everywhere
    kd = Fixed(range(0, 40), 2)  # wrong on rows 40..49
    cmp = compare_with_kd(lelp, kd, test, num_classes=2, n_subclasses=2)
    d = cmp["difference"]
    assert cmp["lelp"]["accuracy"] == 1.0 and cmp["kd"]["accuracy"] == 0.9
    assert d["accuracy"] == pytest.approx(0.1) and (d["lelp_only"], d["kd_only"], d["rows"]) == (10, 0, 100)
    sd = math.sqrt((10 * 0.9 ** 2 + 90 * 0.1 ** 2) / 99)
    half = 1.959963984540054 * sd / math.sqrt(n)
    assert d["interval"] == pytest.approx([0.1 - half, 0.1 + half])
    text = baseline_markdown(cmp)
    assert text.startswith("| KD baseline (S=1, same rows, settings, seed) | 0.9000 | — | — |")
    assert "+10.00 points" in text and "10 rows right only for LELP, 0 only for KD" in text
    assert "LELP is ahead" in text


def test_the_paired_difference_leaves_out_rows_without_a_label():
    """-100 marks a test row without a label: evaluate's accuracies leave it out, so the paired
    difference must too. It counted such rows as a miss for both students (a difference of 0): with
    half the rows unlabelled, +5.00 points over 100 rows where the accuracies differ by 10."""
    n = 100
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    y = (torch.arange(n) < 50).long()
    y[50:] = -100  # rows 50..99 have no label
    test = TensorDataset(x, y)
    lelp = Fixed(range(0, 50), 4)  # right on every labelled row
    kd = Fixed(range(0, 45), 2)  # wrong on rows 45..49
    cmp = compare_with_kd(lelp, kd, test, num_classes=2, n_subclasses=2)
    d = cmp["difference"]
    assert cmp["lelp"]["accuracy"] == 1.0 and cmp["kd"]["accuracy"] == 0.9
    assert d["accuracy"] == pytest.approx(cmp["lelp"]["accuracy"] - cmp["kd"]["accuracy"])
    assert (d["lelp_only"], d["kd_only"], d["rows"]) == (5, 0, 50)
    assert "over the 50 test rows" in baseline_markdown(cmp)


def test_a_test_label_outside_the_classes_is_refused_by_name():
    x = torch.zeros(4, 1)
    test = TensorDataset(x, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"test_data row 2 has label 2"):
        compare_with_kd(Fixed([], 4), Fixed([], 2), test, num_classes=2, n_subclasses=2)
