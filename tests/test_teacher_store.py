"""Stored plain teacher outputs (logits, top-k log-probabilities) for ordinary KD.

Compared with the fp64 reference: ``log_softmax(z/τ)`` (what vanilla KD trains on) and, for top-k,
those log-probabilities renormalised over the k kept classes. Tolerances per stored dtype: one
rounding of logits of order 10 (fp16: ~1e-2 absolute), then fp32 math.
"""

import os

import pytest
import torch
from torch.utils.data import TensorDataset

from lelp_fast import TargetsDataset, reference
from lelp_fast.io import ArraySource
from lelp_fast.offline import store_teacher_outputs
from lelp_fast.ops import distill_loss

C = 7
TOL = {"float32": (1e-5, 1e-5), "float16": (2e-2, 2e-3)}
CHUNK = C * 4 * 50  # 50 rows per shard when the logits are the rows: 5 shards for 230 rows


@pytest.fixture(scope="module")
def logits():
    return 4 * torch.randn(230, C, generator=torch.Generator().manual_seed(0))


def _tree(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "parquet"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stored_logits_give_kd_targets_at_the_tau_chosen_when_reading(logits, tmp_path, fmt, dtype):
    manifest = store_teacher_outputs(logits, str(tmp_path), format=fmt, dtype=dtype, chunk_bytes=CHUNK)
    assert manifest["n_rows"] == 230 and len(manifest["shards"]) == 5
    got = TargetsDataset(str(tmp_path), tau=2.5).targets(range(230))
    want = torch.log_softmax(logits.double() / 2.5, dim=-1)
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    with pytest.raises(ValueError, match="stored teacher logits: pass tau"):
        TargetsDataset(str(tmp_path)).targets([0])
    with pytest.raises(ValueError, match="they take tau .*not beta"):
        TargetsDataset(str(tmp_path), beta=1.0, tau=2.0)
    # the stored logits as a datasets.Dataset need no τ (until session 59 TargetsDataset(dir) refused,
    # saying "pass tau ..., not beta" though no beta was passed)
    assert TargetsDataset(str(tmp_path)).to_hf_dataset().num_rows == 230


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "parquet"])
def test_top_k_is_read_back_dense_and_renormalised(logits, tmp_path, fmt):
    store_teacher_outputs(logits, str(tmp_path), top_k=3, tau=2.0, format=fmt, dtype="float32", chunk_bytes=CHUNK)
    got = TargetsDataset(str(tmp_path)).targets(range(230))
    log_p = torch.log_softmax(logits.double() / 2.0, dim=-1)
    keep = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, log_p.topk(3, dim=-1).indices, True)
    kept = torch.where(keep, log_p, torch.full_like(log_p, float("-inf")))
    want = kept - torch.logsumexp(kept, dim=-1, keepdim=True)
    assert torch.equal(torch.isinf(got), ~keep)
    torch.testing.assert_close(got.double()[keep], want[keep], atol=1e-5, rtol=1e-5)
    # the fused KD loss on those targets (classes at probability 0 included) against the fp64 reference
    s = torch.randn(230, C, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = distill_loss(s, got, num_classes=C, n_subclasses=1, tau=2.0)
    ref = reference.distillation_loss(s.detach().double(), want, num_classes=C, n_subclasses=1, tau=2.0)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)


def test_a_capture_directory_or_a_source_is_stored_the_same(logits, tmp_path):
    src = ArraySource(torch.randn(230, 5), None, logits, name="cap")
    store_teacher_outputs(src, str(tmp_path / "a"), dtype="float32", chunk_bytes=5 * 4 * 50)
    got = TargetsDataset(str(tmp_path / "a"), tau=1.0).targets(range(230))
    torch.testing.assert_close(got, torch.log_softmax(logits, dim=-1), atol=1e-6, rtol=1e-6)


class _Dying(ArraySource):
    """A re-readable source that fails after ``after`` chunks on its first pass (a killed run)."""

    def __init__(self, *args, after, **kwargs):
        super().__init__(*args, **kwargs)
        self.after = after

    def chunks(self, *args, **kwargs):
        for i, chunk in enumerate(super().chunks(*args, **kwargs)):
            if self.after is not None and i == self.after:
                self.after = None
                raise RuntimeError("killed")
            yield chunk


def test_an_interrupted_store_resumes_to_identical_bytes_and_checks_its_shards(logits, tmp_path):
    clean, out = str(tmp_path / "clean"), str(tmp_path / "out")
    store_teacher_outputs(logits, clean, top_k=4, chunk_bytes=CHUNK)
    dying = _Dying(logits, None, logits, name="teacher_logits", after=3)
    with pytest.raises(RuntimeError, match="killed"):
        store_teacher_outputs(dying, out, top_k=4, chunk_bytes=CHUNK)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    store_teacher_outputs(dying, out, top_k=4, chunk_bytes=CHUNK)
    assert _tree(out) == _tree(clean)
    with pytest.raises(ValueError, match="written with other settings"):
        store_teacher_outputs(logits, out, top_k=5, chunk_bytes=CHUNK)
    path = os.path.join(out, "shard-000002.topk_log_probs.npy")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 8
    open(path, "wb").write(bytes(data))
    # the command that rewrites it is named (until session 59: the targets command, which cannot)
    with pytest.raises(ValueError, match=r"shard-000002.topk_log_probs.npy is corrupt.*rerun the teacher-outputs "
                                         r"command \(store_teacher_outputs\)"):
        TargetsDataset(out).targets(range(230))


def test_plain_kd_trains_from_stored_logits_with_distill(logits, tmp_path):
    from lelp_fast.train import TrainSettings, distill

    store_teacher_outputs(logits, str(tmp_path / "kd"), chunk_bytes=CHUNK)
    x = torch.randn(230, 6, generator=torch.Generator().manual_seed(2))
    y = logits.argmax(1)
    torch.manual_seed(0)
    report = distill(torch.nn.Linear(6, C), TensorDataset(x, y), str(tmp_path / "kd"), str(tmp_path / "run"),
                     num_classes=C, n_subclasses=1, compact_temperatures=(None, 2.0),
                     settings=TrainSettings(epochs=2, batch_size=64, tau=2.0, tensorboard=False))
    assert report["epochs_run"] == 2 and report["history"][-1]["train_loss"] > 0


def test_bad_arguments_are_named(logits, tmp_path):
    with pytest.raises(ValueError, match="top_k=8 is more than the teacher's 7 classes"):
        store_teacher_outputs(logits, str(tmp_path), top_k=8)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        store_teacher_outputs(logits, str(tmp_path), top_k=0)
    with pytest.raises(ValueError, match="tau is chosen when reading"):
        store_teacher_outputs(logits, str(tmp_path), tau=2.0)
    with pytest.raises(ValueError, match="teacher logits must be \\(rows x classes\\)"):
        store_teacher_outputs(logits[0], str(tmp_path))
    with pytest.raises(ValueError, match="the source has no teacher logits"):
        store_teacher_outputs(ArraySource(torch.randn(10, 3)), str(tmp_path))
    bad = logits.clone()
    bad[17, 2] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits.*row 17"):
        store_teacher_outputs(bad, str(tmp_path / "nan"))


def test_teacher_outputs_command(logits, tmp_path, capsys):
    import numpy as np

    from lelp_fast.cli import main

    np.save(tmp_path / "z.npy", logits.numpy())
    out = str(tmp_path / "store")
    assert main(["teacher-outputs", "--logits", str(tmp_path / "z.npy"), "--top-k", "3", "--tau", "2",
                 "--dtype", "float32", "--out", out, "--quiet"]) == 0
    assert "230 rows of teacher top-3 log-probabilities at tau=2.0" in capsys.readouterr().out
    direct = str(tmp_path / "direct")
    store_teacher_outputs(logits, direct, top_k=3, tau=2.0, dtype="float32")
    assert torch.equal(TargetsDataset(out).targets(range(230)), TargetsDataset(direct).targets(range(230)))
    with pytest.raises(SystemExit, match="one of the two"):
        main(["teacher-outputs", "--out", out])
    with pytest.raises(SystemExit, match="--capture .*missing: no such file"):
        main(["teacher-outputs", "--capture", str(tmp_path / "missing"), "--out", out])


def test_logits_beyond_float16s_range_are_refused_not_stored_as_inf(tmp_path):
    """A logit of 7e4 was stored as inf in the default float16 store and read back as NaN targets
    (distill then named only "log_targets row 1 contains NaN"); compact targets likewise (a session-66
    audit). The row is named; float32 stores it."""
    from lelp_fast import LELPProjector
    from lelp_fast.offline import generate_targets

    z = torch.tensor([[1.0, 2.0, 3.0], [7e4, 0.0, 1.0]])
    with pytest.raises(ValueError, match=r"teacher_logits row 1 holds 70000, beyond float16's range: store with "
                                         r"dtype float32 or bfloat16"):
        store_teacher_outputs(z, str(tmp_path / "kd"))
    store_teacher_outputs(z, str(tmp_path / "kd32"), dtype="float32")
    assert torch.isfinite(TargetsDataset(str(tmp_path / "kd32"), tau=1.0).targets([0, 1])).all()
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(60, 6, generator=g), torch.arange(60) % 3
    big = torch.randn(60, 3, generator=g)
    big[41, 2] = 2e5
    projector = LELPProjector(2, beta=0.5).fit(ArraySource(h, y, teacher_logits=big))
    with pytest.raises(ValueError, match=r"teacher_logits row 41 holds 200000, beyond float16's range"):
        generate_targets(projector, ArraySource(h, y, teacher_logits=big), str(tmp_path / "compact"), compact=True,
                         dtype="float16")
