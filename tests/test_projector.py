"""LELPProjector: streaming fit equals the in-memory reference; save/load; bad input."""

import pytest
import torch

from lelp_fast import LELPProjector, reference
from conftest import make_problem


def test_fit_equals_reference_in_memory_and_chunked():
    h, w, b, y = make_problem(n=600, d=20, num_classes=3, seed=11)
    a_ref, e_ref = reference.fit_reference(h, y, 3, 4, head_weight=w, seed=3)
    whole = LELPProjector(4, seed=3).fit(h, y, head_weight=w, head_bias=b)
    chunks = [(h[i:i + 97], y[i:i + 97]) for i in range(0, 600, 97)]
    chunked = LELPProjector(4, seed=3).fit(chunks, head_weight=w, head_bias=b)
    for p in (whole, chunked):
        torch.testing.assert_close(p.A.double(), a_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.e.double(), e_ref, rtol=1e-5, atol=1e-5)
    assert whole.null_space


def test_fit_from_float16_numpy_and_teacher_assignment():
    h, w, b, _ = make_problem(n=500, d=16, num_classes=2, seed=12)
    h16 = (h - h.mean(0)).to(torch.float16)
    p = LELPProjector(3, assign="teacher").fit(h16.numpy(), head_weight=w.numpy(), head_bias=b.numpy())
    y_teacher = (h16.double() @ w.T + b).argmax(1)
    a_ref, _ = reference.fit_reference(h16.double(), y_teacher, 2, 3, head_weight=w)
    torch.testing.assert_close(p.A.double(), a_ref, rtol=1e-5, atol=1e-6)


def test_null_space_directions_are_invisible_to_the_head():
    h, w, b, y = make_problem(n=400, d=15, num_classes=3, seed=13)
    p = LELPProjector(4).fit(h, y, head_weight=w, head_bias=b)
    # Every subclass direction is orthogonal to the head rows.
    torch.testing.assert_close(w.float() @ p.A, torch.zeros(3, 12), atol=1e-4, rtol=0)


def test_targets_without_head_need_teacher_logits():
    h, _, _, y = make_problem(n=300, d=12, num_classes=2, seed=14)
    p = LELPProjector(2).fit(h, y)
    assert not p.null_space
    with pytest.raises(ValueError, match="teacher_logits"):
        p.targets(h.float())
    z = torch.randn(300, 2)
    t = p.targets(h.float(), z)
    torch.testing.assert_close(t.exp().reshape(300, 2, 2).sum(-1), torch.softmax(z, -1), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    h, w, b, y = make_problem(n=300, d=14, num_classes=2, seed=15)
    p = LELPProjector(3, beta=0.7, tau=1.5, seed=4).fit(h, y, head_weight=w, head_bias=b)
    path = tmp_path / "proj.safetensors"
    p.save(path)
    q = LELPProjector.load(path)
    assert q.metadata() == p.metadata()
    for name in ("A", "e", "head_weight", "head_bias", "eigenvalues", "class_counts"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name
    x = h[:10].float()
    assert torch.equal(p.targets(x), q.targets(x))
    assert [f.name for f in tmp_path.iterdir()] == ["proj.safetensors"]  # no temp file left


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable"):
        LELPProjector.load(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a lelp_fast projector"):
        LELPProjector.load(foreign)
    # a directory (`lelp-fast inspect CAPTURE_DIR`): "No such device (os error 19)" until session 66
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a projector file"):
        LELPProjector.load(tmp_path)
    h, w, b, y = make_problem(n=200, d=10, num_classes=2, seed=16)
    good = tmp_path / "good.safetensors"
    LELPProjector(2).fit(h, y, head_weight=w, head_bias=b).save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match="not a readable"):
        LELPProjector.load(truncated)


def test_a_flipped_bit_in_the_stored_temperatures_is_an_error(tmp_path):
    """The sha256 of a projector covered its tensors, not its metadata: a flipped bit turning
    beta 0.25 into 0.35 loaded without a word and wrote targets at 0.35 (a session-65 audit)."""
    h, w, b, y = make_problem(n=200, d=10, num_classes=2, seed=16)
    path = tmp_path / "p.safetensors"
    LELPProjector(2, beta=0.25).fit(h, y, head_weight=w, head_bias=b).save(path)
    data = path.read_bytes()
    at = data.index(b'beta\\": 0.25') + len(b'beta\\": 0.2')
    flipped = bytearray(data)
    flipped[at] ^= 0x06  # "5" -> "3": still valid JSON, another beta
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"p.safetensors: its metadata fails its sha256 checksum"):
        LELPProjector.load(path)
    path.write_bytes(bytes(flipped).replace(b"metadata_sha256", b"metadata_sha25X"))  # the checksum's key damaged
    with pytest.raises(ValueError, match=r"p.safetensors: its metadata fails its sha256 checksum"):
        LELPProjector.load(path)


def test_captured_variance_is_a_fraction():
    h, w, b, y = make_problem(n=400, d=10, num_classes=2, seed=17)
    cv = LELPProjector(3).fit(h, y, head_weight=w, head_bias=b).captured_variance()
    assert ((cv > 0) & (cv <= 1)).all()


# ------------------------------------------------------------------ bad input


def test_nan_row_is_named():
    h, w, b, y = make_problem(n=100, d=10, num_classes=2, seed=18)
    h[37, 4] = float("nan")
    with pytest.raises(ValueError, match="embeddings row 37 contains NaN or Inf"):
        LELPProjector(2).fit(h, y, head_weight=w, head_bias=b)
    h[37, 4] = float("inf")
    with pytest.raises(ValueError, match="row 37"):
        LELPProjector(2).fit(h, y, head_weight=w, head_bias=b)


def test_wrong_dims():
    h, w, b, y = make_problem(n=100, d=10, num_classes=2, seed=19)
    with pytest.raises(ValueError, match="embeddings must be a 2-D"):
        LELPProjector(2).fit(h[0], y, head_weight=w)
    with pytest.raises(ValueError, match="head_weight has shape \\(2, 9\\) but the embeddings have d=10"):
        LELPProjector(2).fit(h, y, head_weight=w[:, :9])
    with pytest.raises(ValueError, match=r"chunk 1, row 50\) have d=9, earlier chunks had d=10"):
        LELPProjector(2).fit([(h[:50], y[:50]), (h[50:, :9], y[50:])], head_weight=None, num_classes=2)
    p = LELPProjector(2).fit(h, y, head_weight=w, head_bias=b)
    with pytest.raises(ValueError, match="d=10"):
        p.targets(h[:, :8].float())


def test_labels_out_of_range():
    h, w, b, y = make_problem(n=100, d=10, num_classes=2, seed=20)
    y[5] = 2
    with pytest.raises(ValueError, match=r"labels\[5\] = 2 is out of range"):
        LELPProjector(2).fit(h, y, head_weight=w, head_bias=b)
    y[5] = -1
    with pytest.raises(ValueError, match=r"labels\[5\] = -1"):
        LELPProjector(2).fit(h, y, head_weight=w, head_bias=b)


def test_class_with_too_few_rows():
    h, w, b, _ = make_problem(n=100, d=10, num_classes=2, seed=21)
    y = torch.zeros(100, dtype=torch.int64)
    y[:3] = 1  # class 1 has 3 rows, S = 3 needs 4
    with pytest.raises(ValueError, match="class 1 has 3 rows but n_subclasses=3 needs at least 4"):
        LELPProjector(3).fit(h, y, head_weight=w, head_bias=b)
    y[:] = 0  # class 1 empty
    with pytest.raises(ValueError, match="class 1 has 0 rows"):
        LELPProjector(3).fit(h, y, head_weight=w, head_bias=b)


def test_c_times_s_may_exceed_d_but_each_class_needs_s_directions():
    """C·S > d was refused, but each class needs only S <= d - rank(W) directions of its own."""
    h, w, b, y = make_problem(n=300, d=10, num_classes=3, seed=22)
    p = LELPProjector(6).fit(h, y, head_weight=w, head_bias=b)  # C·S = 18 > d = 10; S = 6 <= 10 - 3
    assert p.A.shape == (10, 18) and torch.isfinite(p.A).all()
    with pytest.raises(ValueError, match=r"n_subclasses=8 exceeds d - rank\(W\) = 7"):
        LELPProjector(8).fit(h, y, head_weight=w, head_bias=b)
    flat = h.clone()
    flat[y == 1, 3:] = 0.0  # class 1 spans only 3 directions (no head: nothing projected out)
    with pytest.raises(ValueError, match="class 1 has only 3 direction"):
        LELPProjector(4).fit(flat, y)


def test_every_row_skipped_says_so():
    h, _, _, y = make_problem(n=50, d=6, num_classes=2, seed=23)
    h[:] = float("nan")
    with pytest.raises(ValueError, match="every row was skipped"):
        LELPProjector(2).fit(h, y, nan_policy="skip", num_classes=2)


def test_bad_settings_and_dtypes():
    with pytest.raises(ValueError, match="n_subclasses"):
        LELPProjector(0)
    with pytest.raises(ValueError, match="beta"):
        LELPProjector(2, beta=0.0)
    with pytest.raises(ValueError, match="assign"):
        LELPProjector(2, assign="oracle")
    h, w, b, y = make_problem(n=100, d=10, num_classes=2, seed=23)
    with pytest.raises(ValueError, match="embeddings must be float"):
        LELPProjector(2).fit(h.to(torch.int32), y, head_weight=w)
    with pytest.raises(ValueError, match="labels must be an integer"):
        LELPProjector(2).fit(h, y.double(), head_weight=w)
    with pytest.raises(ValueError, match="null_space=True needs head_weight"):
        LELPProjector(2, null_space=True).fit(h, y)
    with pytest.raises(RuntimeError, match="not fitted"):
        LELPProjector(2).targets(h)


def test_rank_deficient_class_is_rejected():
    h, w, b, y = make_problem(n=200, d=10, num_classes=2, seed=24)
    y = torch.zeros(200, dtype=torch.int64)
    y[:6] = 1
    h[3:6] = h[0:3] + 0.1 * h[0:1]  # six rows, but their centred span has only 3 directions
    LELPProjector(3).fit(h, y, head_weight=w, head_bias=b)
    with pytest.raises(ValueError, match="class 1: its embeddings span fewer than n_subclasses=5"):
        LELPProjector(5).fit(h, y, head_weight=w, head_bias=b)


def _flip_bit_in_tensor(path, name):
    """Flips one bit inside tensor ``name``'s bytes of a safetensors file."""
    import json
    import struct

    raw = bytearray(open(path, "rb").read())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    start = 8 + header_len + header[name]["data_offsets"][0]
    raw[start + 5] ^= 0x10
    open(path, "wb").write(bytes(raw))


def test_projector_with_a_flipped_bit_is_refused(tmp_path):
    h, w, b, y = make_problem(n=300, d=12, num_classes=2, seed=31)
    path = tmp_path / "p.safetensors"
    LELPProjector(3).fit(h, y, head_weight=w, head_bias=b).save(path)
    LELPProjector.load(path)  # intact: loads
    _flip_bit_in_tensor(path, "A")
    with pytest.raises(ValueError, match="sha256"):
        LELPProjector.load(path)


def test_identical_fits_give_identical_bytes(tmp_path):
    h, w, b, y = make_problem(n=300, d=12, num_classes=2, seed=32)
    for name in ("a", "b"):
        LELPProjector(3).fit(h, y, head_weight=w, head_bias=b).save(tmp_path / f"{name}.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_saved_projector_respects_the_umask(tmp_path):
    import os
    import stat

    h, _, _, y = make_problem(n=200, d=8, num_classes=2, seed=33)
    old = os.umask(0o022)
    try:
        LELPProjector(2).fit(h, y).save(tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p.safetensors").stat().st_mode) == 0o644


def test_nan_head_bias_is_refused_at_fit():
    h, w, b, y = make_problem(n=200, d=8, num_classes=2, seed=34)
    b[1] = float("nan")
    with pytest.raises(ValueError, match="head_bias"):
        LELPProjector(2).fit(h, y, head_weight=w, head_bias=b)


def test_refit_keeps_the_constructor_null_space_setting():
    """null_space=None (auto) after a fit with a head used to become True, so a refit without a head raised."""
    h, w, b, y = make_problem(n=300, d=12, num_classes=2, seed=35)
    p = LELPProjector(2)
    p.fit(h, y, head_weight=w, head_bias=b)
    assert p.null_space
    p.fit(h, y)
    assert not p.null_space and p.head_weight is None


# ---- issue 20: the Python API checks its arguments as strictly as the CLI -----------------------

def test_api_arguments_are_checked_like_the_cli():
    import numpy as np

    h, w, b, y = make_problem(n=200, d=12, num_classes=3)
    assert LELPProjector(np.int64(3)).n_subclasses == 3 and type(LELPProjector(np.int64(3)).n_subclasses) is int
    with pytest.raises(ValueError, match="n_subclasses must be an integer >= 1, got True"):
        LELPProjector(True)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got -1"):
        LELPProjector(2).fit(h, y, num_classes=-1)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1, got 0"):
        LELPProjector(2).fit(h, y, checkpoint_every=0)
    with pytest.raises(ValueError, match="chunk_bytes must be an integer >= 1, got 1000.5"):
        LELPProjector(2).fit(h, y, chunk_bytes=1000.5)


def test_a_transposed_head_is_named_as_such():
    h, w, b, y = make_problem(n=200, d=12, num_classes=3)
    with pytest.raises(ValueError, match="looks transposed: pass W as \\(C, d\\)"):
        LELPProjector(2).fit(h, y, head_weight=w.T, head_bias=b)
    with pytest.raises(ValueError, match="looks transposed"):
        LELPProjector(2).fit(h, y, head_weight=w.T)


def test_a_huge_embedding_value_is_named_with_the_right_advice():
    h, w, b, y = make_problem(n=400, d=16, num_classes=2)
    for method in ("exact", "nystrom"):
        huge = h.float().clone()
        huge[205, 3] = 1e20
        with pytest.raises(ValueError, match="statistics overflowed: embeddings row 205 holds 1e\\+20"):
            LELPProjector(4, method=method).fit(huge, y, head_weight=w, head_bias=b)
        huge[205, 3] = 1e10
        with pytest.raises(ValueError, match="rows hold huge values: look for outliers"):
            LELPProjector(4, method=method).fit(huge, y, head_weight=w, head_bias=b)


def test_a_projector_is_copied_to_another_device_once(monkeypatch):
    """Issue 21 items 4 and 7: the projector stays on the CPU (where load() puts it) and its map was
    copied with ``.to(h.device)`` on every call, a new tensor each time, so the split-map cache keyed
    on that tensor missed: every training step copied and split the map again. Now one copy per device
    and version of the map, the same object each call. The meta device stands in for a GPU."""
    import lelp_fast.projector as projector_module
    from lelp_fast import LELPLoss
    from lelp_fast._derived import on_device

    h, w, b, y = make_problem(n=300, d=12, num_classes=2, seed=16)
    p = LELPProjector(2).fit(h, y, head_weight=w, head_bias=b)
    passed = []
    monkeypatch.setattr(projector_module, "lelp_targets",
                        lambda h, weight, bias, *a, **k: passed.append((weight, bias)))
    on_meta = h.float().to("meta")
    p.targets(on_meta)
    p.targets(on_meta)
    assert passed[0][0].device.type == "meta" and all(x is y for x, y in zip(passed[0], passed[1]))
    loss_fn = LELPLoss(p)
    first, second = (loss_fn._online_arguments(on_meta, None) for _ in range(2))
    assert first["fused_weight"][0] is second["fused_weight"][0] is passed[0][0]
    assert first["fused_bias"][0] is second["fused_bias"][0] is passed[0][1]
    # an in-place edit (an optimiser step, load_state_dict) makes a new copy, then keeps it
    t = torch.ones(3)
    copy = on_device(t, torch.device("meta"))
    t.add_(1.0)
    again = on_device(t, torch.device("meta"))
    assert again is not copy and on_device(t, torch.device("meta")) is again and on_device(t, t.device) is t
    # a first call under inference mode (a validation pass) keeps nothing: the copy kept later is a
    # plain tensor with a version counter, so the caches keyed on it work
    fresh = torch.ones(3)
    with torch.inference_mode():
        on_device(fresh, torch.device("meta"))
    kept = on_device(fresh, torch.device("meta"))
    assert not kept.is_inference() and on_device(fresh, torch.device("meta")) is kept


def test_fit_refuses_a_head_that_does_not_give_the_rows_logits():
    """A fit given rows with their teacher logits and another teacher's head_weight took the wrong
    null space without a word (the targets now refuse such a projector, but only after the fit). The
    head is now held to the logits before the fit's pass, up to a constant a row and a class, and a
    bias given to the logits' bias, up to a constant."""
    h, w, b, y = make_problem(n=300, d=24, num_classes=3, seed=5)
    z = h @ w.T + b
    _, other_w, _, _ = make_problem(n=300, d=24, num_classes=3, seed=6)
    with pytest.raises(ValueError, match=r"its teacher logits are not head_weight and head_bias applied to its embeddings \(off by"):
        LELPProjector(2).fit(h, y, teacher_logits=z, head_weight=other_w, head_bias=b)
    LELPProjector(2).fit(h, y, teacher_logits=torch.log_softmax(z, dim=1), head_weight=w)  # log-probs, no bias
    LELPProjector(2).fit(h.float(), y, teacher_logits=z.bfloat16().float(), head_weight=w, head_bias=b)
    # a bias given is held to the logits' too (targets from rows without logits take it), up to a constant
    LELPProjector(2).fit(h, y, teacher_logits=torch.log_softmax(z, dim=1), head_weight=w, head_bias=b + 3.0)
    with pytest.raises(ValueError, match=r"the weight agrees, but the bias is off by up to"):
        LELPProjector(2).fit(h, y, teacher_logits=z, head_weight=w, head_bias=b + torch.tensor([0.0, 0.0, 2.0]))


def test_a_refused_head_names_the_factor_of_scaled_logits():
    """Logits stored divided by a temperature are refused by the head check as another teacher's; the
    error now says they are the head's logits times a factor, and asks for the unscaled ones. Another
    teacher's head gets no such clause."""
    h, w, b, y = make_problem(n=300, d=24, num_classes=3, seed=5)
    z = h @ w.T + b
    with pytest.raises(ValueError, match=r"times 0\.5, as if divided by a temperature of 2: give the unscaled logits"):
        LELPProjector(2).fit(h, y, teacher_logits=z / 2, head_weight=w)
    _, other_w, _, _ = make_problem(n=300, d=24, num_classes=3, seed=6)
    with pytest.raises(ValueError, match="off by up to") as refused:
        LELPProjector(2).fit(h, y, teacher_logits=z, head_weight=other_w)
    assert "as if divided by" not in str(refused.value)
    flat = 10.0 + 0.01 * torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=z.dtype)
    for seed in range(10):  # near-constant logits: a factor near 0 fits them, which says nothing
        _, random_w, _, _ = make_problem(n=300, d=24, num_classes=3, seed=10 + seed)
        with pytest.raises(ValueError, match="off by up to") as refused:
            LELPProjector(2).fit(h, y, teacher_logits=flat, head_weight=random_w)
        assert "as if divided by" not in str(refused.value)


def test_a_fit_given_logits_and_no_bias_takes_the_bias_the_logits_show():
    """A fit given a head's weight and the rows' logits but no bias stored a zero bias: the head
    check let the logits' bias pass (a constant a class), and targets from embeddings alone (the
    online loss, rows without logits) then took class logits h Wᵀ without it. The fit now takes the
    bias from the logits' per-class constants (up to one constant, which no softmax sees); with no
    logits to read, zero as before. A capture of the same teacher, whose stored bias differs from
    the estimate by that constant, is still this teacher's."""
    from types import SimpleNamespace

    h, w, b, y = make_problem(n=300, d=24, num_classes=3, seed=5)
    b = b + torch.tensor([2.0, -1.0, 0.5], dtype=b.dtype)  # a bias a softmax sees
    z = h @ w.T + b
    given = LELPProjector(2).fit(h, y, teacher_logits=z, head_weight=w, head_bias=b)
    for logits in (z, torch.log_softmax(z, dim=1), z.float()):
        p = LELPProjector(2).fit(h, y, teacher_logits=logits, head_weight=w)
        torch.testing.assert_close(p.targets(h[:64]), given.targets(h[:64]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(p.targets(h[:64]), p.targets(h[:64], teacher_logits=z[:64]), atol=1e-4, rtol=1e-4)
        p.require_same_teacher(SimpleNamespace(head=lambda: (w, b), directory="capture"))
        with pytest.raises(ValueError, match="bias differs from the projector's"):
            p.require_same_teacher(SimpleNamespace(head=lambda: (w, b + torch.tensor([0.0, 0.0, 2.0])),
                                                   directory="capture"))
    assert float(LELPProjector(2).fit(h, y, head_weight=w).head_bias.abs().max()) == 0.0  # no logits


def test_teacher_logits_of_fewer_classes_than_the_labels_are_named():
    """C is taken from the teacher logits' width when no head or num_classes is given; logits of too
    few columns were then reported as a label out of range ("labels[1] = 2 is out of range: labels
    must lie in [0, 1]"), the labels being right (a session-64 walkthrough)."""
    h, w, b, y = make_problem(n=300, d=16, num_classes=3, seed=1)
    z = h @ w.T + b
    with pytest.raises(ValueError, match=r"teacher_logits have 2 columns \(C = 2\), but the labels go up to 2"):
        LELPProjector(2).fit(h, y, teacher_logits=z[:, :2])
    assert LELPProjector(2).fit(h, y, teacher_logits=z).num_classes == 3
    # by the teacher's classes the labels are not read (a review: labels of a larger set were refused)
    z_y = torch.nn.functional.one_hot(y, 3).double() * 4 + z * 1e-3  # the teacher predicts the labels
    assert LELPProjector(2, assign="teacher").fit(h, y + 5, teacher_logits=z_y).num_classes == 3


def test_a_save_into_a_missing_directory_and_a_resume_without_a_checkpoint_are_named(tmp_path):
    """save('nodir/p.safetensors') failed naming its temporary file ('.tmp-p.safetensors-fhupun15');
    fit(resume=True) without checkpoint= (lelp-fast fit --resume without --checkpoint) was taken
    without a word (a session-64 walkthrough)."""
    h, w, b, y = make_problem(n=200, d=12, num_classes=2, seed=3)
    p = LELPProjector(2).fit(h, y)
    missing = tmp_path / "nodir" / "p.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nodir/p.safetensors: its directory .*nodir does not exist$"):
        p.save(missing)
    with pytest.raises(ValueError, match=r"resume=True \(--resume\) continues a checkpoint: pass checkpoint="):
        LELPProjector(2).fit(h, y, resume=True)


def test_a_fit_without_a_checkpoint_reads_no_fingerprint_of_its_source(monkeypatch):
    """An array's fingerprint hashes every byte (a memmap not in the page cache: one more read of the
    file); only a checkpoint needs it (a review of session 64)."""
    from lelp_fast.io.sources import ArraySource

    calls = []
    original = ArraySource.fingerprint
    monkeypatch.setattr(ArraySource, "fingerprint", lambda self: calls.append(1) or original(self))
    h, w, b, y = make_problem(n=200, d=12, num_classes=2, seed=3)
    LELPProjector(2).fit(h, y)
    assert calls == []
