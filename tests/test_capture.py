"""Capture: a teacher's embeddings, logits, labels and head as resumable, checksummed shards."""

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lelp_fast import LELPProjector
from lelp_fast.capture import CaptureSource, capture
from lelp_fast.io.locks import ExclusiveLock
from lelp_fast.io.sources import ArraySource
from lelp_fast.offline import generate_targets


def tiny_teacher(d_in=12, hidden=8, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def loader(n=103, d_in=12, classes=3, batch=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False), x, y


def _tree(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def test_capture_stores_head_input_logits_labels_and_head(tmp_path):
    model = tiny_teacher()
    dl, x, y = loader()
    manifest = capture(model, dl, str(tmp_path / "cap"), dtype="float32", batches_per_shard=3)
    assert manifest["n_rows"] == 103 and len(manifest["shards"]) == 4  # 11 batches, 3 per shard
    src = CaptureSource(str(tmp_path / "cap"), verify=True)
    got = src.tensors()
    with torch.no_grad():
        emb = model[1](model[0](x))
        logits = model(x)
    torch.testing.assert_close(got["embeddings"], emb)
    torch.testing.assert_close(got["teacher_logits"], logits)
    assert torch.equal(got["labels"], y)
    w, b = src.head()
    assert torch.equal(w, model[2].weight.detach()) and torch.equal(b, model[2].bias.detach())


def test_layer_hook_and_custom_forward(tmp_path):
    model = tiny_teacher()
    dl, x, y = loader()
    capture(model, dl, str(tmp_path / "a"), layer="0", head=None, dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(CaptureSource(str(tmp_path / "a")).tensors()["embeddings"], model[0](x))

    def forward(m, batch):  # e.g. a transformers model: any batch, any outputs
        inputs, labels = batch
        h = m[1](m[0](inputs))
        return h * 2, m[2](h), labels

    capture(model, dl, str(tmp_path / "b"), forward=forward, head=None, dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(CaptureSource(str(tmp_path / "b")).tensors()["embeddings"],
                                   2 * model[1](model[0](x)))


class _Killed(Exception):
    pass


def _dying(dl, after):
    for i, batch in enumerate(dl):
        if i == after:
            raise _Killed()
        yield batch


@pytest.mark.parametrize("after", [2, 7])
def test_killed_capture_resumes_to_identical_bytes(tmp_path, after):
    model = tiny_teacher()
    dl, _, _ = loader()
    clean, resumed = str(tmp_path / "clean"), str(tmp_path / "resumed")
    capture(model, dl, clean, batches_per_shard=2)
    with pytest.raises(_Killed):
        capture(model, _dying(dl, after), resumed, batches_per_shard=2)
    capture(model, dl, resumed, batches_per_shard=2)
    assert _tree(clean) == _tree(resumed)


def test_capture_is_locked_checked_and_repaired(tmp_path):
    model = tiny_teacher()
    dl, _, _ = loader()
    out = str(tmp_path / "cap")
    os.makedirs(out)
    with ExclusiveLock(os.path.join(out, ".lock-rank0"), "test"):
        with pytest.raises(RuntimeError, match="capture directory .* is in use"):
            capture(model, dl, out)
    capture(model, dl, out, batches_per_shard=4)
    with pytest.raises(ValueError, match="other settings"):
        capture(model, dl, out, batches_per_shard=5)
    with pytest.raises(ValueError, match="other settings"):  # another teacher
        capture(tiny_teacher(seed=5), dl, out, batches_per_shard=4)
    clean = _tree(out)
    os.unlink(os.path.join(out, "shard-000001.safetensors"))
    capture(model, dl, out, batches_per_shard=4)  # rewrites the missing shard
    assert _tree(out) == clean


def test_fit_and_targets_read_a_capture_directly(tmp_path):
    model = tiny_teacher(hidden=16)
    dl, _, _ = loader(n=400, batch=50)
    out = str(tmp_path / "cap")
    capture(model, dl, out, dtype="float32")
    src = CaptureSource(out)
    w, b = src.head()
    p = LELPProjector(2).fit(out, head_weight=w, head_bias=b)
    t = src.tensors()
    want = LELPProjector(2).fit(t["embeddings"], t["labels"], head_weight=w, head_bias=b)
    torch.testing.assert_close(p.A, want.A)
    manifest = generate_targets(p, out, str(tmp_path / "targets"), dtype="float32")
    assert manifest["n_rows"] == 400


def test_bad_arguments(tmp_path):
    model = tiny_teacher()
    dl, _, _ = loader()
    with pytest.raises(ValueError, match="layer='nope'"):
        capture(model, dl, str(tmp_path / "a"), layer="nope")
    with pytest.raises(ValueError, match="dtype"):
        capture(model, dl, str(tmp_path / "b"), dtype="int8")
    with pytest.raises(ValueError, match="head='auto' found no nn.Linear"):
        capture(nn.Sequential(nn.ReLU()), dl, str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="capture directory .* does not exist"):
        CaptureSource(str(tmp_path / "missing"))


def _rank_worker(rank, world, init_file, out, pass_group=True):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dl, _, _ = loader()
        group = {"process_group": dist.group.WORLD} if pass_group else {}
        capture(tiny_teacher(), dl, out, batches_per_shard=2, **group)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pass_group", [True, False])
def test_two_ranks_write_the_same_directory_as_one_process(tmp_path, pass_group):
    """Without process_group (until session 66) each rank took itself for the only one and they
    failed on each other's lock: the initialised group is taken, as distill takes it."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two"), pass_group), nprocs=2, join=True)
    dl, _, _ = loader()
    capture(tiny_teacher(), dl, str(tmp_path / "one"), batches_per_shard=2)
    assert _tree(str(tmp_path / "two")) == _tree(str(tmp_path / "one"))


def test_capture_under_autocast(tmp_path):
    """autocast='bfloat16' runs the teacher in bf16 (here on the CPU): close to the fp32 capture."""
    model = tiny_teacher()
    dl, _, _ = loader()
    capture(model, dl, str(tmp_path / "fp32"), dtype="float32")
    capture(model, dl, str(tmp_path / "bf16"), dtype="float32", autocast="bfloat16")
    a = CaptureSource(str(tmp_path / "fp32")).tensors()
    b = CaptureSource(str(tmp_path / "bf16")).tensors()
    assert not torch.equal(a["teacher_logits"], b["teacher_logits"])  # it did run in bf16
    torch.testing.assert_close(b["teacher_logits"], a["teacher_logits"], atol=5e-2, rtol=5e-2)
    with pytest.raises(ValueError, match="autocast"):
        capture(model, dl, str(tmp_path / "x"), autocast="int8")


# ---- issue 20: the right head, every setting recorded, errors that name the dataset row ----------

class HeadFirst(nn.Module):
    """The head registered before the body: 'the last nn.Linear' is a hidden layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


class MatmulHead(nn.Module):
    """A head that is a plain matmul: the only nn.Linear is in the body."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
        self.w = nn.Parameter(torch.randn(16, 3))

    def forward(self, x):
        return self.body(x) @ self.w


@pytest.mark.parametrize("model_cls, found", [(HeadFirst, "'body.2'"), (MatmulHead, "'body.0'")])
def test_a_wrong_head_is_refused_naming_the_module_and_the_fix(tmp_path, model_cls, found):
    dl, _, _ = loader()
    with pytest.raises(ValueError, match=f"the head found, {found}.*not the teacher's head.*head=.*layer=.*forward="):
        capture(model_cls(), dl, str(tmp_path / "cap"), dtype="float32")
    assert not os.path.exists(tmp_path / "cap" / "manifest.json")
    model = HeadFirst()
    capture(model, dl, str(tmp_path / "named"), head="head", dtype="float32")  # the fix the error names
    w, _ = CaptureSource(str(tmp_path / "named")).head()
    assert torch.equal(w, model.head.weight.detach())


def test_another_layer_on_a_finished_capture_is_not_the_old_capture(tmp_path):
    """``layer`` and ``head`` are part of the capture's settings (a comment had swallowed them)."""
    model = tiny_teacher()
    dl, x, _ = loader()
    capture(model, dl, str(tmp_path / "cap"), layer="0", head=None, dtype="float32")
    with pytest.raises(ValueError, match="layer"):
        capture(model, dl, str(tmp_path / "cap"), layer="1", head=None, dtype="float32")
    manifest = capture(model, dl, str(tmp_path / "other"), layer="1", head=None, dtype="float32")
    assert manifest["settings"]["layer"] == "1" and "head" in manifest["settings"]


def test_an_empty_loader_is_an_error_not_an_empty_capture(tmp_path):
    empty = DataLoader(TensorDataset(torch.zeros(0, 12), torch.zeros(0, dtype=torch.long)), batch_size=10)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        capture(tiny_teacher(), empty, str(tmp_path / "cap"), dtype="float32")
    assert not os.path.exists(tmp_path / "cap" / "manifest.json")
    dl, _, _ = loader()
    assert capture(tiny_teacher(), dl, str(tmp_path / "cap"), dtype="float32")["n_rows"] == 103


def test_errors_name_the_dataset_row_and_the_batch(tmp_path):
    dl, x, y = loader()
    bad = x.clone()
    bad[57, 3] = float("nan")  # batch 5, row 7 of it
    nan_loader = DataLoader(TensorDataset(bad, y), batch_size=10)
    with pytest.raises(ValueError, match=r"dataset row 57 \(batch 5\) contains NaN"):
        capture(tiny_teacher(), nan_loader, str(tmp_path / "nan"), dtype="float32", head=None, layer="1")

    class Huge(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_teacher()

        def forward(self, x):
            return self.inner(x * torch.where(torch.arange(x.shape[0])[:, None] == 2, 1e20, 1.0))

    with pytest.raises(ValueError, match=r"dataset row 2 \(batch 0\) hold .* beyond torch.float16"):
        capture(Huge(), dl, str(tmp_path / "huge"), dtype="float16", head=None, layer="inner.0")

    def widening(model, batch):
        inputs, labels = batch
        h = torch.cat([inputs] * (1 + int(inputs.shape[0] < 10)), 1)
        return h, model(inputs), labels

    with pytest.raises(ValueError, match="batch 10: embeddings/logits are 24/3 wide, earlier batches 12/3"):
        capture(tiny_teacher(), dl, str(tmp_path / "wide"), dtype="float32", forward=widening)


def test_a_flipped_byte_in_a_capture_shard_is_refused_where_it_is_read(tmp_path):
    from lelp_fast.cli import main

    model = tiny_teacher()
    dl, _, _ = loader()
    cap = str(tmp_path / "cap")
    capture(model, dl, cap, dtype="float32", batches_per_shard=3)
    shard = tmp_path / "cap" / "shard-000001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01  # a value's byte: the file still parses
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard-000001.safetensors is corrupt"):
        LELPProjector(2).fit(cap)
    with pytest.raises(ValueError, match="shard-000001.safetensors is corrupt"):
        CaptureSource(cap).tensors()
    projector = LELPProjector(2).fit(CaptureSource(cap, verify=False))  # the explicit opt-out
    with pytest.raises(ValueError, match="shard-000001.safetensors is corrupt"):
        generate_targets(projector, cap, str(tmp_path / "targets"))
    assert main(["fit", "--embeddings", cap, "--out", str(tmp_path / "p.safetensors"), "--quiet"]) == 2
    assert main(["fit", "--embeddings", cap, "--out", str(tmp_path / "p.safetensors"), "--quiet", "--no-verify"]) == 0


def test_a_flipped_bit_in_the_stored_head_is_refused_where_it_is_read_and_a_rerun_repairs_it(tmp_path):
    """The head file had no checksum: a flipped bit of W was fitted into the projector (its null space)
    and the targets, silently. Now the manifest records it, every read checks it, and rerunning the
    capture rewrites it."""
    model = tiny_teacher()
    dl, _, _ = loader()
    cap = str(tmp_path / "cap")
    capture(model, dl, cap, dtype="float32")
    head = tmp_path / "cap" / "head.safetensors"
    intact = head.read_bytes()
    raw = bytearray(intact)
    raw[-3] ^= 0x40  # a byte of b's last value: the file still parses
    head.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="head.safetensors is corrupt.*rerun the capture"):
        CaptureSource(cap).head()
    with pytest.raises(ValueError, match="head.safetensors is corrupt"):
        LELPProjector(2).fit(cap)
    assert CaptureSource(cap, verify=False).head() is not None  # the explicit opt-out
    with pytest.warns(RuntimeWarning, match="head.safetensors is corrupt.*rewriting it"):
        capture(model, dl, cap, dtype="float32")
    assert head.read_bytes() == intact
    head.unlink()
    with pytest.raises(FileNotFoundError, match="head.safetensors is recorded as written but is missing"):
        CaptureSource(cap)
    with pytest.warns(RuntimeWarning, match="missing; rewriting it"):
        capture(model, dl, cap, dtype="float32")
    assert torch.equal(CaptureSource(cap).head()[0], model[2].weight.detach())


def test_fit_of_a_capture_uses_its_stored_head(tmp_path):
    model = tiny_teacher()
    dl, _, _ = loader()
    cap = str(tmp_path / "cap")
    capture(model, dl, cap, dtype="float32")
    projector = LELPProjector(2).fit(cap)
    assert projector.null_space and torch.equal(projector.head_weight, model[2].weight.detach())
    assert not LELPProjector(2, null_space=False).fit(cap).null_space


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_capture_opens_as_a_hf_dataset(tmp_path, dtype):
    pytest.importorskip("datasets", reason="datasets is not installed (pip install 'lelp_fast[datasets]')")
    model = tiny_teacher()
    dl, x, y = loader()
    capture(model, dl, str(tmp_path / "cap"), dtype=dtype, batches_per_shard=3)
    ds = CaptureSource(str(tmp_path / "cap")).to_hf_dataset()
    assert ds.num_rows == 103 and ds.column_names == ["embeddings", "teacher_logits", "labels"]
    rows = ds.with_format("torch")[:]
    with torch.no_grad():  # the teacher's own outputs, rounded once to the stored dtype
        emb = model[1](model[0](x)).to(getattr(torch, dtype)).float()
        logits = model(x)
    assert torch.equal(rows["embeddings"], emb)
    torch.testing.assert_close(rows["teacher_logits"], logits)
    assert torch.equal(rows["labels"], y)
    shard = tmp_path / "cap" / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 4
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-000001.safetensors is corrupt: its xxh3_128 checksum does not match"):
        CaptureSource(str(tmp_path / "cap")).to_hf_dataset()


def test_the_documented_imports_and_no_import_circle():
    """``capture_text`` is where docs/user_path.md says; io (below capture) never imports capture:
    a capture directory is a registered source."""
    import ast
    import pathlib

    from lelp_fast.capture import capture_text  # noqa: F401
    from lelp_fast.io.sources import as_source

    io_dir = pathlib.Path(__file__).resolve().parent.parent / "lelp_fast" / "io"
    for path in io_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "capture" not in (node.module or ""), f"{path.name} imports {node.module}"
    with pytest.raises(ValueError, match="is not a finished capture"):
        as_source(str(io_dir))  # a directory that is not a capture


def test_targets_refuse_a_projector_fitted_on_another_teachers_capture(tmp_path):
    """A projector fitted on teacher A's capture gave targets from teacher B's capture of the same
    width without an error (a session-59 walkthrough). The stored heads tell the teachers apart; a
    capture of the same teacher on another split is taken, even with its head in bf16."""
    dl, _, _ = loader(n=200, batch=50)
    for name, seed in (("a", 0), ("b", 5)):
        capture(tiny_teacher(hidden=16, seed=seed), dl, str(tmp_path / name), dtype="float32")
    projector = LELPProjector(2).fit(str(tmp_path / "a"))
    refused = r"/b: its teacher head's weight differs from the projector's by up to .*another teacher's; fit a"
    with pytest.raises(ValueError, match=refused):
        generate_targets(projector, str(tmp_path / "b"), str(tmp_path / "targets-b"), dtype="float32")
    assert not os.path.exists(tmp_path / "targets-b")
    other_split, _, _ = loader(n=120, batch=40, seed=9)
    teacher = tiny_teacher(hidden=16, seed=0)
    capture(teacher, other_split, str(tmp_path / "a-test"), dtype="float32")
    assert generate_targets(projector, str(tmp_path / "a-test"), str(tmp_path / "t"), dtype="float32")["n_rows"] == 120
    capture(teacher.to(torch.bfloat16), other_split, str(tmp_path / "a-bf16"), dtype="float32",
            forward=lambda m, b: (m[1](m[0](b[0].bfloat16())).float(), m(b[0].bfloat16()).float(), b[1]))
    manifest = generate_targets(projector, str(tmp_path / "a-bf16"), str(tmp_path / "t16"), dtype="float32")
    assert manifest["n_rows"] == 120
    w, b = CaptureSource(str(tmp_path / "a")).head()  # the same weights, the bias left out of the fit:
    without_bias = LELPProjector(2).fit(str(tmp_path / "a"), head_weight=w)  # the logits' bias, centred
    done = generate_targets(without_bias, str(tmp_path / "a-test"), str(tmp_path / "t0"), dtype="float32")
    assert done["n_rows"] == 120
    rows = next(iter(CaptureSource(str(tmp_path / "a")).chunks()))  # no logits: the bias given is taken
    other_bias = LELPProjector(2).fit(rows.embeddings, rows.labels, head_weight=w,
                                      head_bias=b + torch.tensor([0.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match=r"/a-test: its teacher head's bias differs .*without --head-bias"):
        generate_targets(other_bias, str(tmp_path / "a-test"), str(tmp_path / "t1"), dtype="float32")


def test_targets_refuse_rows_with_no_stored_head_whose_logits_are_another_teachers(tmp_path):
    """The head check passed any source with no stored head: a capture made with ``forward=`` (head
    None), arrays, Parquet. A projector fitted with teacher A's head then gave targets from teacher
    B's rows of the same widths (session 60 left this). Such a source is now held to its logits: the
    fitted head applied to its first rows must give them, up to a constant a row (log-probabilities
    pass) and a class (a fit without the head's bias passes); A's own rows pass, stored in bf16 too."""
    dl, _, _ = loader(n=200, batch=50)
    headless = dict(dtype="float32", forward=lambda m, b: (m[1](m[0](b[0])), m(b[0]), b[1]))
    teachers = {name: tiny_teacher(hidden=16, seed=seed) for name, seed in (("a", 0), ("b", 5))}
    for name, teacher in teachers.items():
        capture(teacher, dl, str(tmp_path / name), **headless)
    assert CaptureSource(str(tmp_path / "b")).head() is None
    head = teachers["a"][2]
    projector = LELPProjector(2).fit(str(tmp_path / "a"), head_weight=head.weight.detach(),
                                     head_bias=head.bias.detach())
    refused = r"/b: its teacher logits are not the projector's head applied to its embeddings \(off by up to"
    with pytest.raises(ValueError, match=refused):
        generate_targets(projector, str(tmp_path / "b"), str(tmp_path / "targets-b"), dtype="float32")
    assert not os.path.exists(tmp_path / "targets-b")
    assert generate_targets(projector, str(tmp_path / "a"), str(tmp_path / "t"), dtype="float32")["n_rows"] == 200
    capture(teachers["a"], dl, str(tmp_path / "a-bf16"), dtype="bfloat16", forward=headless["forward"])
    assert generate_targets(projector, str(tmp_path / "a-bf16"), str(tmp_path / "t16"))["n_rows"] == 200
    rows = {name: next(iter(CaptureSource(str(tmp_path / name)).chunks())) for name in ("a", "b")}
    b = rows["b"]
    arrays = ArraySource(b.embeddings.numpy(), b.labels.numpy(), b.teacher_logits.numpy(), name="b.npy")
    with pytest.raises(ValueError, match="b.npy: its teacher logits are not the projector's head"):
        generate_targets(projector, arrays, str(tmp_path / "targets-npy"), dtype="float32")
    a = rows["a"]
    log_probs = ArraySource(a.embeddings, a.labels, torch.log_softmax(a.teacher_logits, dim=1))
    assert generate_targets(projector, log_probs, str(tmp_path / "t-log"), dtype="float32")["n_rows"] == 200
    without_bias = LELPProjector(2).fit(str(tmp_path / "a"), head_weight=head.weight.detach())
    assert generate_targets(without_bias, str(tmp_path / "a"), str(tmp_path / "t-nb"), dtype="float32")["n_rows"] == 200


def test_a_refused_capture_rerun_says_what_its_data_fingerprint_is():
    """A rerun refused for its rows' fingerprint alone named two hashes ("written with other settings
    (data: '1c0e…' there, '9a4b…' now)"), and the same when no fingerprint was given now."""
    from lelp_fast.offline import manifest as mf

    with pytest.raises(ValueError, match=r"cap: the rows captured there are not the rows given now .*covers the texts"):
        mf.check_settings("cap", {"data": "1c0e", "dtype": "float32"}, {"data": "9a4b", "dtype": "float32"})
    with pytest.raises(ValueError, match=r"recorded a fingerprint of its rows and none was given now \(pass the same"):
        mf.check_settings("cap", {"data": "1c0e", "dtype": "float32"}, {"dtype": "float32"})
    with pytest.raises(ValueError, match="written with other settings .*dtype"):  # with another setting: as before
        mf.check_settings("cap", {"data": "1c0e", "dtype": "float32"}, {"data": "9a4b", "dtype": "bfloat16"})


def test_a_capture_refused_before_writing_leaves_no_directory_it_made(tmp_path):
    """A capture refused at its first batch (a NaN row here) left an empty directory behind (session
    59's walkthrough), as targets did until session 58. One the user made is kept, as is a partial
    capture's shards, to be resumed."""
    _, x, y = loader()
    x = x.clone()
    x[3] = float("nan")
    nan_first = DataLoader(TensorDataset(x, y), batch_size=10)
    for out in (tmp_path / "new", tmp_path / "made"):
        if out.name == "made":
            out.mkdir()
        with pytest.raises(ValueError, match="dataset row 3 .* contains NaN or Inf"):
            capture(tiny_teacher(), nan_first, str(out), dtype="float32")
        assert os.path.exists(out) == (out.name == "made")
    x[3], x[64] = 0.0, float("nan")
    with pytest.raises(ValueError, match="dataset row 64"):
        capture(tiny_teacher(), DataLoader(TensorDataset(x, y), batch_size=10), str(tmp_path / "partial"),
                dtype="float32", batches_per_shard=2)
    assert "shard-000000.safetensors" in os.listdir(tmp_path / "partial")


def test_labels_out_of_the_teachers_range_are_refused_at_the_batch_that_holds_them(tmp_path):
    """Labels 1..C (or any outside [0, C)) were captured and refused only by the fit, after the whole
    teacher pass; -100 (an unlabelled row, as the loss's ignore_index) is kept."""
    dl, x, y = loader()
    shifted = y.clone()
    shifted[64] = 3  # three classes: 0, 1, 2
    with pytest.raises(ValueError, match=r"label 3 of dataset row 64 \(batch 6\) is outside \[0, 2\]"):
        capture(tiny_teacher(), DataLoader(TensorDataset(x, shifted), batch_size=10), str(tmp_path / "bad"),
                dtype="float32")
    assert not os.path.exists(tmp_path / "bad" / "manifest.json")
    unlabelled = y.clone()
    unlabelled[5] = -100
    manifest = capture(tiny_teacher(), DataLoader(TensorDataset(x, unlabelled), batch_size=10),
                       str(tmp_path / "ok"), dtype="float32")
    assert manifest["n_rows"] == 103
    with pytest.raises(ValueError, match=r'= -100 is out of range.*fit with assign="teacher"'):
        LELPProjector(2).fit(str(tmp_path / "ok"))
    assert LELPProjector(2, assign="teacher").fit(str(tmp_path / "ok")).fit_info["rows"] == 103
    as_bytes = y.to(torch.uint8)
    as_bytes[3] = 156  # -100 as a uint8: a label out of range, not a row without one
    with pytest.raises(ValueError, match=r"label 156 of dataset row 3 \(batch 0\)"):
        capture(tiny_teacher(), DataLoader(TensorDataset(x, as_bytes), batch_size=10), str(tmp_path / "u8"),
                dtype="float32")


@pytest.mark.parametrize("bias", [False, True])
def test_a_fit_given_the_weight_alone_takes_the_bias_of_a_bf16_teachers_capture(tmp_path, bias):
    """A fit given --head-weight without its bias took the bias its rows' logits showed; from a bf16
    forward (autocast) they show it to about 0.03 at logits of 36, and the same teacher's capture was
    then refused as holding another bias (a review of session 64's first form; targets held the bias
    to 1 % of the weight). A capture's stored bias is now taken where its weight is the one given,
    and a bias taken from logits (arrays in bf16) is held only as closely as they showed it."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(32, 256), nn.ReLU())
    head = nn.Linear(256, 10, bias=bias)
    with torch.no_grad():  # logits of about 36
        body[0].weight.mul_(4.0)
        head.weight.mul_(8.0)
        if bias:
            head.bias.copy_(torch.randn(10))
    teacher = nn.Sequential(body, head)
    for name, seed in (("a", 1), ("b", 2)):
        g = torch.Generator().manual_seed(seed)
        rows = TensorDataset(torch.randn(256, 32, generator=g), torch.randint(0, 10, (256,), generator=g))
        capture(teacher, DataLoader(rows, batch_size=64), str(tmp_path / name), dtype="float16", autocast="bfloat16")
    w, b = CaptureSource(str(tmp_path / "a")).head()
    p = LELPProjector(2).fit(str(tmp_path / "a"), head_weight=w)
    assert torch.equal(p.head_bias, b.float()) and "head_bias_from_logits" not in p.fit_info
    assert p.fit_info["head_bias_from"] == "capture"  # also a head without a bias: its stored zeros (a review)
    assert generate_targets(p, str(tmp_path / "b"), str(tmp_path / "t"), dtype="float32")["n_rows"] == 256
    chunk = next(iter(CaptureSource(str(tmp_path / "a")).chunks()))  # the same rows as arrays: no stored head
    arrays = LELPProjector(2).fit(chunk.embeddings, chunk.labels, teacher_logits=chunk.teacher_logits, head_weight=w)
    assert arrays.fit_info["head_bias_from_logits"] > 0
    arrays.save(tmp_path / "p.safetensors")
    again = LELPProjector.load(tmp_path / "p.safetensors")
    assert generate_targets(again, str(tmp_path / "b"), str(tmp_path / "t2"), dtype="float32")["n_rows"] == 256


def test_a_loader_that_shuffles_its_rows_is_refused(tmp_path):
    """DataLoader(shuffle=True) was captured without a word: the targets then sat on other rows than
    train_data's, and distill trained on them (validation accuracy 0.39 against 0.76 in order, a
    session-64 walkthrough on Fashion-MNIST). A sampler that draws rows at random is now refused
    before the teacher runs; a sequential one, or a distributed one without shuffling, is taken."""
    from torch.utils.data import DistributedSampler, RandomSampler

    _, x, y = loader(n=40)
    data = TensorDataset(x, y)
    shuffled = {"shuffle=True": DataLoader(data, batch_size=10, shuffle=True),
                "RandomSampler": DataLoader(data, batch_size=10, sampler=RandomSampler(data)),
                "DistributedSampler": DataLoader(data, batch_size=10,
                                                 sampler=DistributedSampler(data, num_replicas=1, rank=0))}
    for name, dl in shuffled.items():
        with pytest.raises(ValueError, match="loader draws its rows at random .*shuffle=False"):
            capture(tiny_teacher(), dl, str(tmp_path / "c"), dtype="float32")
        assert not os.path.exists(tmp_path / "c"), name
    in_order = DataLoader(data, batch_size=10, sampler=DistributedSampler(data, num_replicas=1, rank=0, shuffle=False))
    assert capture(tiny_teacher(), in_order, str(tmp_path / "d"), dtype="float32")["n_rows"] == 40
    # a share of the rows (a review: under 2 ranks the capture held half the rows, out of order)
    share = DataLoader(data, batch_size=10, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(ValueError, match=r"loader gives this rank 1/2 of the rows \(DistributedSampler\): every rank "
                                         r"must read the whole loader"):
        capture(tiny_teacher(), share, str(tmp_path / "e"), dtype="float32")


def test_a_fit_on_a_capture_without_a_head_takes_c_from_the_stored_logits(tmp_path):
    """A capture made with forward= stores no head; the fit took C from the labels (2 when only two
    of three classes were labelled, 1 when every row was -100), so a fit with assign="teacher"
    failed on "teacher_logits must have shape (200, 2)" (a session-66 audit)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(200, 5)

    def forward(m, batch):
        inputs, labels = batch
        h = m[1](m[0](inputs))
        return h, m[2](h), labels

    for name, labels in (("two", torch.randint(0, 2, (200,))), ("none", torch.full((200,), -100))):
        out = str(tmp_path / name)
        capture(model, DataLoader(TensorDataset(x, labels), batch_size=50), out, forward=forward)
        assert CaptureSource(out).max_label() == (1 if name == "two" else None)
        assert LELPProjector(2, beta=0.5, assign="teacher").fit(out).num_classes == 3


def test_a_lock_taken_before_its_holder_is_written_says_holder_unknown(tmp_path):
    """Locked and not yet written (the holder writes its pid after the flock), the message read
    "pid None on None since None: None" (a session-66 audit)."""
    import fcntl

    from lelp_fast.io.locks import LockHeldError

    path = tmp_path / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(LockHeldError, match=r"in use by another run \(holder unknown; lock"):
            ExclusiveLock(str(path), "a directory").acquire()
    finally:
        os.close(fd)


def test_an_out_dir_that_is_a_file_is_named(tmp_path):
    """`lelp-fast capture --out data.csv` said "[Errno 17] File exists" (a session-66 audit)."""
    path = tmp_path / "data.csv"
    path.write_text("text,label\n")
    dl, _, _ = loader()
    with pytest.raises(NotADirectoryError, match=r"out_dir .*data.csv \(--out\) is a file"):
        capture(tiny_teacher(), dl, str(path))
    assert path.read_text() == "text,label\n"
