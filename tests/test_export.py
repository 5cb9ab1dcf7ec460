"""Export: the student with the S-way pooling folded in answers with C class logits.

Every exported form is compared with ``reference.class_logits`` of the student's outputs in fp64.
Tolerance: the exported graphs compute in fp32, so 1e-5 absolute / relative (a few fp32 ulps of
logits of order 1, the error of PyTorch's own fp32 logsumexp against fp64).
"""

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lelp_fast import class_logits
from lelp_fast.cli import main
from lelp_fast.export import PooledClassifier, export_module, load_exported

ATOL = RTOL = 1e-5
C, S = 3, 4


def mlp(k=C * S, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, k)).eval()


def reference(student, x, tau):
    with torch.no_grad():
        return class_logits(student.double()(x.double()), C, S, tau)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_pooled_classifier_equals_the_fp64_reference(tau):
    student, x = mlp(), 3 * torch.randn(64, 10)
    got = PooledClassifier(student, C, S, tau)(x)
    assert got.shape == (64, C) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(student, x, tau), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fmt,suffix", [("torch-export", ".pt2"), ("torchscript", ".ts")])
def test_saved_program_takes_any_batch_and_equals_the_reference(tmp_path, fmt, suffix):
    student = mlp()
    path = str(tmp_path / f"student{suffix}")
    export_module(student, path, torch.randn(2, 10), num_classes=C, n_subclasses=S, tau=2.0, format=fmt)
    x = 3 * torch.randn(37, 10)  # another batch size than the example's
    with torch.no_grad():
        got = load_exported(path, fmt)(x)
        by_itself = load_exported(path)(x)  # the format read from the file (session 58: TorchScript failed)
    torch.testing.assert_close(got.double(), reference(student, x, 2.0), atol=ATOL, rtol=RTOL)
    assert torch.equal(by_itself, got)


def test_the_format_is_read_from_torch_exports_of_older_layouts(tmp_path):
    """torch < 2.8 wrote .pt2 archives without ``archive_format``; they are torch.export files too (a first
    form of session 58 took only the new layout for one)."""
    import zipfile

    from lelp_fast.export.module import exported_format

    path = str(tmp_path / "student.pt2")
    export_module(mlp(), path, torch.randn(2, 10), num_classes=C, n_subclasses=S, format="torch-export")
    older = str(tmp_path / "older.pt2")
    with zipfile.ZipFile(path) as new, zipfile.ZipFile(older, "w") as old:
        for name in new.namelist():
            if not name.endswith("/archive_format"):
                old.writestr(name, new.read(name))
    assert exported_format(path) == exported_format(older) == "torch-export"


def test_onnx_export_is_one_file(tmp_path):
    """The weights go inside the .onnx file: until session 58 they went to a student.onnx.data beside it,
    which no message named, so a copied student.onnx could not be loaded elsewhere."""
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript")
    path = str(tmp_path / "student.onnx")
    export_module(mlp(), path, torch.randn(2, 10), num_classes=C, n_subclasses=S, tau=2.0, format="onnx")
    assert os.listdir(tmp_path) == ["student.onnx"]
    with pytest.raises(ValueError, match=r"is not a zip archive \(an ONNX model\?\): load ONNX with onnxruntime"):
        load_exported(path)


def test_onnx_runs_in_onnxruntime_and_equals_the_reference(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'lelp_fast[export]')")
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript")
    student, path = mlp(), str(tmp_path / "student.onnx")
    export_module(student, path, torch.randn(2, 10), num_classes=C, n_subclasses=S, tau=2.0, format="onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["class_logits"]
    x = 3 * torch.randn(37, 10)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got).double(), reference(student, x, 2.0), atol=ATOL, rtol=RTOL)


def test_bad_export_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="the student has 12 outputs, but num_classes \\* n_subclasses = 5 \\* 4"):
        export_module(mlp(), str(tmp_path / "a.pt2"), torch.randn(2, 10), num_classes=5, n_subclasses=4)
    with pytest.raises(ValueError, match="format must be one of"):
        export_module(mlp(), str(tmp_path / "a.x"), torch.randn(2, 10), num_classes=C, n_subclasses=S, format="tf")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        export_module(mlp(), str(tmp_path / "nowhere" / "a.pt2"), torch.randn(2, 10), num_classes=C, n_subclasses=S)
    with pytest.raises(ValueError, match="tau"):
        PooledClassifier(mlp(), C, S, tau=0.0)


# ---------------------------------------------------------------- a run config's student


def tiny_task(work_dir, **kwargs):
    """A task factory (``test_export:tiny_task``) with just what export reads: a student and one input."""
    from types import SimpleNamespace

    data = torch.utils.data.TensorDataset(torch.randn(8, 10), torch.zeros(8, dtype=torch.long))
    return SimpleNamespace(train=data, make_student=lambda k: mlp(k, seed=1))


def test_export_command_writes_a_run_configs_student(tmp_path, capsys):
    from lelp_fast.io.integrity import save_checked

    work = tmp_path / "work"
    (work / "student").mkdir(parents=True)
    trained = mlp(seed=7)  # stands for the trained weights distill wrote
    (work / "student" / "student.safetensors").write_bytes(save_checked(trained.state_dict()))  # as distill writes
    (work / "student" / "report.json").write_text(json.dumps({"num_classes": C, "n_subclasses": S,
                                                              "settings": {"tau": 3.0}}))
    (tmp_path / "run.yaml").write_text(f"work_dir: {work}\ntask: {{factory: 'test_export:tiny_task'}}\n")
    out = str(tmp_path / "student.pt2")
    assert main(["export", str(tmp_path / "run.yaml"), "--out", out]) == 0
    assert "3 class logits (S=4 pooled at tau=3.0)" in capsys.readouterr().out
    x = torch.randn(5, 10)
    with torch.no_grad():
        got = load_exported(out)(x)
    torch.testing.assert_close(got.double(), reference(trained, x, 3.0), atol=ATOL, rtol=RTOL)
    with pytest.raises(SystemExit, match="are for --hf-model"):
        main(["export", str(tmp_path / "run.yaml"), "--labels", "a", "--out", out])
    # --set as the run was given it (until session 58 export and tune took none)
    (tmp_path / "elsewhere.yaml").write_text(f"work_dir: {tmp_path / 'none'}\ntask: {{factory: 'test_export:tiny_task'}}\n")
    assert main(["export", str(tmp_path / "elsewhere.yaml"), "--set", f"work_dir={work}", "--out", out]) == 0
    # a config edited since the run: the trained student is exported, and the warning says so (until
    # session 64 without a word; a walkthrough)
    with pytest.warns(UserWarning, match=r"holds the student trained with S=4, tau=3.0; the config now says "
                                         r"fit.subclasses=8, train.tau=3.0: exporting the trained one"):
        assert main(["export", str(tmp_path / "run.yaml"), "--set", "fit.subclasses=8", "--set", "train.tau=3",
                     "--out", out]) == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*holds the student")
        assert main(["export", str(tmp_path / "run.yaml"), "--set", "fit.subclasses=4", "--set", "train.tau=3",
                     "--out", out]) == 0

def test_tune_takes_set_as_run_does(tmp_path, monkeypatch):
    """tune read the YAML alone until session 58, so it redid a capture that run had made with --set."""
    import lelp_fast.tune

    seen = []
    monkeypatch.setattr(lelp_fast.tune, "tune", lambda cfg, grid, capture_dir=None: seen.append(cfg))
    (tmp_path / "run.yaml").write_text(f"work_dir: {tmp_path}\ntask: {{factory: 'test_export:tiny_task'}}\n")
    assert main(["tune", str(tmp_path / "run.yaml"), "--set", "train.epochs=2", "--set", "fit.beta=0.5"]) == 0
    assert seen[0].train.epochs == 2 and seen[0].fit.beta == 0.5


def test_export_command_needs_exactly_one_source(tmp_path, capsys):
    with pytest.raises(SystemExit, match="one of the two"):
        main(["export", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--subclasses"):
        main(["export", "--hf-model", str(tmp_path), "--out", str(tmp_path / "x")])


# ---------------------------------------------------------------- transformers students

WORDS = ["good", "great", "bad", "awful", "movie", "plot"]


@pytest.fixture(scope="module")
def hf_student(tmp_path_factory):
    """A tiny BERT student with C*S labels and its tokenizer, saved; weights large enough that the
    texts give different logits."""
    transformers = pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("hf_export")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=C * S, max_position_embeddings=32,
                                  initializer_range=0.5)
    student = transformers.BertForSequenceClassification(cfg).eval()
    student.save_pretrained(str(tmp / "student"))
    tokenizer.save_pretrained(str(tmp / "student"))
    return tmp, student, tokenizer


TEXTS = ["good movie", "awful plot", "great great plot", "bad"]


def hf_reference(student, tokenizer, tau):
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return class_logits(student(**enc).logits.double(), C, S, tau)


def test_hf_export_loads_back_with_c_labels_and_pooled_logits(hf_student):
    from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

    from lelp_fast.export.hf import export_hf

    tmp, student, tokenizer = hf_student
    out = str(tmp / "classifier")
    export_hf(str(tmp / "student"), out, n_subclasses=S, tau=2.0, labels=["neg", "neutral", "pos"])
    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == C and config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert config.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model(**enc).logits
    want = hf_reference(student, tokenizer, 2.0)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)
    assert len(set(want.argmax(1).tolist())) > 1  # the texts are told apart: the labels below mean something
    answers = pipeline("text-classification", model=out)(TEXTS)
    names = ["neg", "neutral", "pos"]
    assert [a["label"] for a in answers] == [names[i] for i in want.argmax(1).tolist()]
    top = torch.softmax(want, 1).max(1).values
    torch.testing.assert_close(torch.tensor([a["score"] for a in answers], dtype=torch.float64), top, atol=1e-5,
                               rtol=1e-5)


def test_hf_export_loads_without_lelp_fast_through_remote_code(hf_student, tmp_path):
    tmp, student, tokenizer = hf_student
    from lelp_fast.export.hf import export_hf

    out = str(tmp_path / "classifier")
    export_hf(student, out, n_subclasses=S, tau=1.0, labels=["a", "b", "c"], tokenizer=tokenizer)
    code = ("import sys, torch; from transformers import pipeline\n"
            "assert 'lelp_fast' not in sys.modules\n"
            f"p = pipeline('text-classification', model={out!r}, trust_remote_code=True)\n"
            f"print({{a['label'] for a in p({TEXTS!r})}} <= {{'a', 'b', 'c'}})\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # lelp_fast must not be importable: only the copied hf_pooled.py
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("True")


def test_hf_export_of_a_student_saved_without_a_tokenizer_saves_none(hf_student, tmp_path):
    """A student directory without tokenizer files: until session 58 transformers built a tokenizer from
    its config alone (5 special tokens, every word [UNK]) and the export shipped it, so pipeline() gave
    every text the same score. Now none is saved, with a warning naming the directory and the fix; a
    tokenizer given is saved."""
    from transformers import AutoTokenizer

    from lelp_fast.export.hf import export_hf

    _, student, tokenizer = hf_student
    bare = str(tmp_path / "bare")
    student.save_pretrained(bare)
    with pytest.warns(UserWarning, match="bare holds no tokenizer: .*pass tokenizer="):
        export_hf(bare, str(tmp_path / "cls"), n_subclasses=S)
    assert not [name for name in os.listdir(tmp_path / "cls") if "tok" in name or "vocab" in name]
    export_hf(bare, str(tmp_path / "given"), n_subclasses=S, tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "given")).get_vocab() == tokenizer.get_vocab()


def test_hf_export_of_a_tokenizer_directory_that_is_not_one_writes_nothing(hf_student, tmp_path):
    """--tokenizer nope asked the hub for 'nope' (no network: "couldn't connect to huggingface.co")
    after the model had been written, leaving an export without a tokenizer. Found by a walkthrough."""
    from lelp_fast.cli import main
    from lelp_fast.export.hf import export_hf

    _, student, _ = hf_student
    student.save_pretrained(str(tmp_path / "student"))
    (tmp_path / "empty").mkdir()
    for name in ("nope", "empty"):
        with pytest.raises(FileNotFoundError, match=rf"tokenizer .*{name} \(--tokenizer\): not a directory holding"):
            export_hf(str(tmp_path / "student"), str(tmp_path / "out"), n_subclasses=S, tokenizer=str(tmp_path / name))
        assert not (tmp_path / "out").exists()
    assert main(["export", "--hf-model", str(tmp_path / "student"), "--subclasses", str(S), "--tokenizer",
                 str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2


def test_hf_export_refuses_labels_that_do_not_fit(hf_student, tmp_path):
    from lelp_fast.export.hf import export_hf

    tmp, student, _ = hf_student
    with pytest.raises(ValueError, match="labels has 2 names, but the student's 12 outputs / n_subclasses 4 give 3"):
        export_hf(student, str(tmp_path / "x"), n_subclasses=S, labels=["a", "b"])
    with pytest.raises(ValueError, match="labels must be a list of the 3 class names"):
        export_hf(student, str(tmp_path / "x"), n_subclasses=S, labels="neg pos neutral")
    with pytest.raises(ValueError, match="not a multiple of n_subclasses=5"):
        export_hf(student, str(tmp_path / "x"), n_subclasses=5)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        export_hf(str(tmp_path / "missing"), str(tmp_path / "x"), n_subclasses=S)


def test_export_command_for_a_transformers_student(hf_student, tmp_path, capsys):
    tmp, student, tokenizer = hf_student
    out = str(tmp_path / "cls")
    assert main(["export", "--hf-model", str(tmp / "student"), "--subclasses", str(S), "--tau", "2",
                 "--labels", "x", "y", "z", "--out", out]) == 0
    assert "labels x, y, z" in capsys.readouterr().out
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(got.double(), hf_reference(student, tokenizer, 2.0), atol=ATOL, rtol=RTOL)


def test_an_export_killed_while_writing_leaves_the_old_file_or_none(tmp_path, monkeypatch):
    """export_module wrote in place: an export killed or failing while writing left a partial file
    under the name a user ships (a session-65 audit, from the code). It now writes beside it and
    renames."""
    from lelp_fast.export import module

    path = tmp_path / "student.pt2"

    def dies_half_way(model, out, example):
        with open(out, "wb") as f:
            f.write(b"PK\x03\x04 part of a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_save_program", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        export_module(mlp(), str(path), torch.randn(2, 10), num_classes=C, n_subclasses=S)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_module(mlp(), str(path), torch.randn(2, 10), num_classes=C, n_subclasses=S)
    whole = path.read_bytes()
    monkeypatch.setattr(module, "_save_program", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        export_module(mlp(), str(path), torch.randn(2, 10), num_classes=C, n_subclasses=S)
    assert path.read_bytes() == whole and [p.name for p in tmp_path.iterdir()] == ["student.pt2"]


# ---------------------------------------------------------------- session-66 audit of shipping a student

@pytest.mark.parametrize("fmt", ["torch-export", "torchscript", "onnx"])
def test_an_export_to_a_name_without_a_suffix_works_and_its_bytes_repeat(tmp_path, fmt):
    """Since exports were written through a temp file (session 65), torch's archives took their
    inner name from that random name: a name without a suffix (the CLI's `--out student`) failed in
    torch's writer ("invalid file name"), and every export of the same student had other bytes."""
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    student, x = mlp(), torch.randn(2, 10)
    path = tmp_path / "student"
    export_module(student, str(path), x, num_classes=C, n_subclasses=S, tau=2.0, format=fmt)
    first = path.read_bytes()
    if fmt != "torchscript":  # TorchScript numbers its classes per process: its bytes repeat in a new one
        export_module(student, str(path), x, num_classes=C, n_subclasses=S, tau=2.0, format=fmt)
        assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temp left
    if fmt != "onnx":
        with torch.no_grad():
            got = load_exported(str(path), fmt)(3 * torch.randn(5, 10))
        assert got.shape == (5, C)
    with pytest.raises(IsADirectoryError, match=r"it is a directory; name the file to write in it"):
        export_module(student, str(tmp_path), x, num_classes=C, n_subclasses=S, format=fmt)


def test_an_export_leaves_the_students_mode_and_unwraps_ddp_and_compile(tmp_path):
    """export_module left a training student in eval mode (dropout off for the rest of its training);
    a student wrapped in DDP or torch.compile failed inside torch (export_hf: _orig_mod. keys, no
    .config on DDP)."""
    import torch.distributed as dist

    student = nn.Sequential(nn.Linear(10, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, C * S)).train()
    x = torch.randn(4, 10)
    export_module(student, str(tmp_path / "a.pt2"), x, num_classes=C, n_subclasses=S)
    assert all(m.training for m in student.modules())
    student.eval()
    want = reference(copy.deepcopy(student), x, 1.0)  # reference() turns its student to fp64
    compiled = torch.compile(student)
    export_module(compiled, str(tmp_path / "c.ts"), x, num_classes=C, n_subclasses=S, format="torchscript")
    with torch.no_grad():
        torch.testing.assert_close(load_exported(str(tmp_path / "c.ts"))(x).double(), want, atol=ATOL, rtol=RTOL)
    if not dist.is_available():
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(student)
        export_module(wrapped, str(tmp_path / "d.pt2"), x, num_classes=C, n_subclasses=S)
    finally:
        dist.destroy_process_group()
    with torch.no_grad():
        torch.testing.assert_close(load_exported(str(tmp_path / "d.pt2"))(x).double(), want, atol=ATOL, rtol=RTOL)


def test_pooling_at_a_small_tau_does_not_overflow():
    """s/τ overflowed fp32 at τ < 1: logits of 3e38 at τ = 0.5 pooled to inf where class_logits, which
    shifts first, gives 3e38."""
    from lelp_fast.export.hf_pooled import _pool

    s = torch.tensor([[3e38, 1.0, -5.0, 2.0, 0.0, 0.0, 1.0, -1.0, 4.0, 4.0, 4.0, 4.0]])
    student = nn.Identity()
    want = class_logits(s, C, S, 0.5)
    assert torch.isfinite(want).all()
    got = PooledClassifier(student, C, S, 0.5)(s)
    torch.testing.assert_close(got, want.float())
    torch.testing.assert_close(_pool(s.unflatten(-1, (C, S)), 0.5), want.float())
    empty = torch.full((1, C * S), float("-inf"))
    empty[0, S:] = 1.0
    assert PooledClassifier(student, C, S, 0.5)(empty)[0, 0] == float("-inf")


def test_a_damaged_report_or_hf_weights_are_named_in_one_line(tmp_path, hf_student, capsys):
    """`lelp-fast export` with a report.json missing a key printed a KeyError traceback, and --hf-model
    with a damaged model.safetensors a 28-line SafetensorError traceback (exit 1, not 2)."""
    from lelp_fast.io.integrity import save_checked

    work = tmp_path / "work"
    (work / "student").mkdir(parents=True)
    (work / "student" / "student.safetensors").write_bytes(save_checked(mlp().state_dict()))
    (tmp_path / "run.yaml").write_text(f"work_dir: {work}\ntask: {{factory: 'test_export:tiny_task'}}\n")
    for damaged in ({"num_classes": C, "n_subclasses": S}, [1], {"num_classes": C, "n_subclasses": S, "settings": 3}):
        (work / "student" / "report.json").write_text(json.dumps(damaged))
        assert main(["export", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "s.pt2")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "report.json is damaged" in err and "--redo train" in err, err
    tmp, _, _ = hf_student
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tmp / "student", broken)
    (broken / "model.safetensors").write_bytes(b"\x05\x00" + (broken / "model.safetensors").read_bytes()[2:40])
    assert main(["export", "--hf-model", str(broken), "--subclasses", str(S), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"student {broken}: cannot be loaded" in err, err


def test_hf_export_of_a_compiled_student_saves_the_student(hf_student, tmp_path):
    """export_hf(torch.compile(student)) failed loading its `_orig_mod.` keys (a session-66 audit)."""
    from transformers import AutoModelForSequenceClassification

    from lelp_fast.export.hf import export_hf

    tmp, student, tokenizer = hf_student
    export_hf(torch.compile(student), str(tmp_path / "out"), n_subclasses=S, tau=2.0, tokenizer=tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        got = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(got.double(), hf_reference(student, tokenizer, 2.0), atol=ATOL, rtol=RTOL)
