"""The distillation loop: stored targets in, a trained student and its report out; resumable."""

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lelp_fast import LELPProjector
from lelp_fast.capture import CaptureSource, capture
from lelp_fast.offline import generate_targets
from lelp_fast.train import TrainSettings, distill, evaluate, load_student
from lelp_fast.train import loop as train_loop


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A teacher trained on a 2-class toy task, its capture, projector and targets (S = 2)."""
    tmp = tmp_path_factory.mktemp("train")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 10, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    train, val = TensorDataset(x[:500], y[:500]), TensorDataset(x[500:], y[500:])
    capture(teacher, DataLoader(train, batch_size=100), str(tmp / "cap"), dtype="float32")
    capture(teacher, DataLoader(val, batch_size=100), str(tmp / "cap_val"), dtype="float32")
    w, b = CaptureSource(str(tmp / "cap")).head()
    projector = LELPProjector(2, beta=0.5).fit(str(tmp / "cap"), head_weight=w, head_bias=b)
    generate_targets(projector, str(tmp / "cap"), str(tmp / "targets"), dtype="float32")
    val_logits = CaptureSource(str(tmp / "cap_val")).tensors()["teacher_logits"]
    return dict(tmp=tmp, train=train, val=val, val_logits=val_logits, targets=str(tmp / "targets"))


def student():
    torch.manual_seed(1)
    return nn.Linear(10, 4)


def _run(stored, out, **kw):
    settings = TrainSettings(**{"epochs": 6, "batch_size": 64, "lr": 3e-2, "tensorboard": False, **kw})
    return distill(student(), stored["train"], stored["targets"], out, num_classes=2, n_subclasses=2,
                   val_data=stored["val"], val_teacher_logits=stored["val_logits"], settings=settings)


def test_distill_trains_and_reports(stored, tmp_path):
    report = _run(stored, str(tmp_path / "run"), tensorboard=True)
    hist = report["history"]
    assert len(hist) == 6 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert report["best"]["accuracy"] > 0.9 and hist[-1]["val_agreement"] > 0.9
    for name in ("report.json", "report.md", "curves.png", "student.safetensors", "checkpoint.pt"):
        assert os.path.exists(tmp_path / "run" / name), name
    assert os.listdir(tmp_path / "run" / "tensorboard")
    trained = load_student(student(), str(tmp_path / "run"))
    metrics = evaluate(trained, stored["val"], 2, 2, teacher_logits=stored["val_logits"])
    assert metrics["accuracy"] == pytest.approx(report["best"]["accuracy"])
    assert _run(stored, str(tmp_path / "run")) == json.load(open(tmp_path / "run" / "report.json"))  # skipped


def test_killed_training_resumes_to_identical_bytes(stored, tmp_path, monkeypatch):
    _run(stored, str(tmp_path / "clean"))
    original = train_loop._Run._train_epoch
    calls = {"n": 0}

    def dying(self, progress):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed in epoch 4")
        return original(self, progress)

    monkeypatch.setattr(train_loop._Run, "_train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(stored, str(tmp_path / "resumed"))
    monkeypatch.setattr(train_loop._Run, "_train_epoch", original)
    _run(stored, str(tmp_path / "resumed"))
    for name in ("student.safetensors", "report.json"):
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_early_stopping_and_corrupt_checkpoint(stored, tmp_path):
    report = _run(stored, str(tmp_path / "early"), epochs=40, patience=2, lr=0.1)
    assert report["epochs_run"] < 40
    assert report["epochs_run"] - report["best"]["epoch"] == 2
    out = tmp_path / "corrupt"
    with pytest.raises(KeyboardInterrupt):
        original = train_loop._Run._save

        def save_then_die(self):
            original(self)
            raise KeyboardInterrupt()

        train_loop._Run._save = save_then_die
        try:
            _run(stored, str(out))
        finally:
            train_loop._Run._save = original
    raw = bytearray((out / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (out / "checkpoint.pt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checkpoint .* sha256"):
        _run(stored, str(out))


def test_bad_settings_name_the_key(stored, tmp_path):
    with pytest.raises(ValueError, match="train.epochs"):
        _run(stored, str(tmp_path / "a"), epochs=0)
    with pytest.raises(ValueError, match="train.divergence"):
        _run(stored, str(tmp_path / "b"), divergence="l2")
    with pytest.raises(ValueError, match="K=4 outputs, the student setup C\\*S = 6"):
        distill(nn.Linear(10, 6), stored["train"], stored["targets"], str(tmp_path / "c"), num_classes=2,
                n_subclasses=3, settings=TrainSettings(tensorboard=False))


def test_online_training_from_the_captured_embeddings(stored, tmp_path):
    """Targets computed in the loss from the capture's stored embeddings equal the stored targets' run."""
    from lelp_fast.train import OnlineTargets

    offline = _run(stored, str(tmp_path / "offline"))
    w, b = CaptureSource(str(stored["tmp"] / "cap")).head()
    projector = LELPProjector(2, beta=0.5).fit(str(stored["tmp"] / "cap"), head_weight=w, head_bias=b)
    settings = TrainSettings(epochs=6, batch_size=64, lr=3e-2, tensorboard=False)
    online = distill(student(), stored["train"], OnlineTargets(projector, str(stored["tmp"] / "cap")),
                     str(tmp_path / "online"), num_classes=2, n_subclasses=2, val_data=stored["val"],
                     val_teacher_logits=stored["val_logits"], settings=settings)
    for a, b_ in zip(offline["history"], online["history"]):
        assert a["train_loss"] == pytest.approx(b_["train_loss"], rel=1e-4, abs=1e-6)
    assert online["best"]["accuracy"] == pytest.approx(offline["best"]["accuracy"], abs=0.02)


def test_subclass_weight_reaches_the_loss_of_stored_targets(stored, tmp_path):
    """λ = 0.5: the first epoch's mean soft loss is the reference's λ-weighted KL of the initial
    student (one batch holding every row, so the epoch is one step from that student)."""
    from lelp_fast import reference
    from lelp_fast.offline import TargetsDataset

    x = torch.stack([row[0] for row in stored["train"]])
    log_t = TargetsDataset(stored["targets"]).targets(list(range(len(stored["train"])))).double()
    want = float(reference.subclass_weighted_kl(student()(x).double(), log_t, 2, 2, 1.0, 0.5).mean())
    report = _run(stored, str(tmp_path / "offline"), epochs=1, batch_size=500, subclass_weight=0.5)
    assert report["history"][0]["train_soft"] == pytest.approx(want, rel=1e-5)
    plain = _run(stored, str(tmp_path / "plain"), epochs=1, batch_size=500)
    assert plain["history"][0]["train_soft"] != pytest.approx(want, rel=1e-3)
    with pytest.raises(ValueError, match="train.subclass_weight must be >= 0"):
        TrainSettings(subclass_weight=-0.5).check()
