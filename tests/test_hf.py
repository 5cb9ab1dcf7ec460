"""transformers: capture a saved classifier over a local text table, then train with LELPTrainer."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lelp_fast import LELPLoss, LELPProjector  # noqa: E402
from lelp_fast.capture import CaptureSource  # noqa: E402
from lelp_fast.capture.text import TextBatches, capture_text, load_classifier, read_text_table  # noqa: E402
from lelp_fast.cli import main  # noqa: E402
from lelp_fast.offline import generate_targets  # noqa: E402

WORDS = ["good", "great", "fine", "bad", "awful", "boring", "movie", "plot", "the", "a", "is", "was"]


def tiny_bert(num_labels, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=num_labels, max_position_embeddings=32)
    return BertForSequenceClassification(cfg)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny BERT teacher and its tokenizer saved with save_pretrained, and a CSV of texts."""
    from transformers import BertTokenizerFast

    tmp = tmp_path_factory.mktemp("hf")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tokenizer.save_pretrained(str(tmp / "teacher"))
    tiny_bert(2).save_pretrained(str(tmp / "teacher"))
    g = torch.Generator().manual_seed(0)
    rows = ["text,label"]
    for i in range(120):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (5,), generator=g)]
        label = int(sum(w in ("good", "great", "fine") for w in words) >= 1)
        rows.append(f"{' '.join(words)},{label}")
    (tmp / "data.csv").write_text("\n".join(rows) + "\n")
    return tmp


def test_capture_command_reads_a_saved_model_and_a_text_column(saved, capsys):
    out = str(saved / "cap")
    assert main(["capture", "--model", str(saved / "teacher"), "--data", str(saved / "data.csv"),
                 "--text-column", "text", "--label-column", "label", "--batch-size", "16", "--dtype", "float32",
                 "--out", out, "--quiet"]) == 0
    src = CaptureSource(out)
    t = src.tensors()
    model, tokenizer = load_classifier(str(saved / "teacher"))
    texts, labels = read_text_table(str(saved / "data.csv"))
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out_full = model(**enc, output_hidden_states=True)
        pooled = model.bert.pooler(out_full.hidden_states[-1])
    torch.testing.assert_close(t["teacher_logits"], out_full.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(t["embeddings"], pooled, atol=1e-5, rtol=1e-4)
    assert torch.equal(t["labels"], labels)
    w, b = src.head()
    assert torch.equal(w, model.classifier.weight.detach())
    assert "wrote" in capsys.readouterr().out


def test_a_capture_of_other_text_or_tokenisation_is_refused(saved, tmp_path):
    """capture_text records a fingerprint of its rows (texts, labels, tokenizer, max_length, batch_size):
    a rerun into the same directory with any of them changed is refused, the same rerun keeps the
    capture. Until session 58 another --data file or --max-length returned the old capture as it was;
    until session 61 the refusal named only the two fingerprints ("written with other settings (data:
    '1c0e…' there, '9a4b…' now)"), not what they cover."""
    cap = str(tmp_path / "cap")
    kwargs = dict(dtype="float32", batch_size=16, max_length=16)
    first = capture_text(str(saved / "teacher"), str(saved / "data.csv"), cap, **kwargs)
    assert capture_text(str(saved / "teacher"), str(saved / "data.csv"), cap, **kwargs) == first
    rows = (saved / "data.csv").read_text().splitlines()
    fewer = tmp_path / "fewer.csv"
    fewer.write_text("\n".join(rows[:-1]) + "\n")
    for data, edit in ((fewer, {}), (saved / "data.csv", {"max_length": 4}), (saved / "data.csv", {"batch_size": 8})):
        with pytest.raises(ValueError, match="rows captured there are not the rows given now .* covers the texts"):
            capture_text(str(saved / "teacher"), str(data), cap, **{**kwargs, **edit})
    assert main(["capture", "--model", str(saved / "teacher"), "--data", str(fewer), "--batch-size", "16",
                 "--max-length", "16", "--dtype", "float32", "--out", cap, "--quiet"]) == 2
    # a capture recorded before the fingerprint existed is kept (its rows cannot be checked), with a warning
    manifest = os.path.join(cap, "manifest.json")
    record = json.loads(open(manifest).read())
    del record["settings"]["data"]
    with open(manifest, "w") as f:
        json.dump(record, f)
    with pytest.warns(UserWarning, match="captured before captures recorded a fingerprint of their rows"):
        kept = capture_text(str(saved / "teacher"), str(fewer), cap, **kwargs)
    assert kept["shards"] == first["shards"]


def test_lelp_trainer_keeps_the_targets_column_and_trains(saved, tmp_path):
    from transformers import TrainingArguments

    from lelp_fast.train.hf import LELPTrainer, WithTargets

    cap = str(saved / "cap2")
    capture_text(str(saved / "teacher"), str(saved / "data.csv"), cap, dtype="float32", batch_size=16)
    src = CaptureSource(cap)
    w, b = src.head()
    projector = LELPProjector(2, beta=0.5).fit(cap, head_weight=w, head_bias=b)
    generate_targets(projector, cap, str(tmp_path / "targets"), dtype="float32")
    _, tokenizer = load_classifier(str(saved / "teacher"))
    texts, labels = read_text_table(str(saved / "data.csv"))
    enc = tokenizer(texts, padding="max_length", max_length=12, return_tensors="pt")
    rows = [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(texts))]
    train = WithTargets(rows, str(tmp_path / "targets"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_train_epochs=6,
                             learning_rate=5e-3, logging_steps=5, report_to=[], save_strategy="no",
                             use_cpu=True, seed=0)
    student = tiny_bert(projector.n_outputs, seed=1)
    trainer = LELPTrainer(model=student, args=args, train_dataset=train, lelp_loss=LELPLoss(projector))
    result = trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and "loss_soft" in logged[0] and "loss_hard" in logged[0]
    assert logged[-1]["loss"] < logged[0]["loss"] and result.training_loss > 0
    plain = [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(20)]
    metrics = trainer.evaluate(plain)  # no targets column: the pooled cross-entropy
    assert metrics["eval_loss"] > 0


def test_lelp_trainer_with_gradient_accumulation_takes_the_step_of_the_whole_batch(tmp_path):
    """Batches of 4 accumulated twice give the update and logged loss of one batch of 8. The loss is
    a per-batch mean, but Trainer took it as scaled for accumulation already (BERT's forward takes
    **kwargs): the update and the logged loss were 2x (a walkthrough of session 65)."""
    from transformers import TrainingArguments

    from lelp_fast.train.hf import LELPTrainer, WithTargets

    g = torch.Generator().manual_seed(0)
    n = 16
    y = torch.randint(0, 2, (n,), generator=g)
    h = torch.randn(n, 6, generator=g) + 2.0 * y[:, None]
    projector = LELPProjector(4).fit(h, y, head_weight=torch.randn(2, 6, generator=g), head_bias=torch.zeros(2))
    generate_targets(projector, h, str(tmp_path / "targets"))
    ids = torch.randint(5, 5 + len(WORDS), (n, 8), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": y[i]} for i in range(n)]

    def one_step(batch, accumulation):
        student = tiny_bert(projector.n_outputs, seed=1)
        for module in student.modules():  # no dropout: the two runs see the same function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        before = [p.detach().clone() for p in student.parameters()]
        args = TrainingArguments(output_dir=str(tmp_path / f"out{batch}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1,
                                 optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1,
                                 report_to=[], save_strategy="no", use_cpu=True, seed=1, data_seed=1)
        trainer = LELPTrainer(model=student, args=args, train_dataset=WithTargets(rows, str(tmp_path / "targets")),
                              lelp_loss=LELPLoss(projector))
        trainer.train()
        step = torch.cat([(p.detach() - b).flatten() for p, b in zip(student.parameters(), before)])
        return step, next(h for h in trainer.state.log_history if "loss" in h)

    whole, logged_whole = one_step(8, 1)
    accumulated, logged_accumulated = one_step(4, 2)
    assert float(whole.norm()) > 0
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-6)
    assert logged_accumulated["loss"] == pytest.approx(logged_whole["loss"], rel=1e-3)
    assert logged_accumulated["loss"] == pytest.approx(logged_accumulated["loss_soft"], rel=1e-3)  # alpha = 0


def test_text_table_errors_name_the_file_and_column(saved, tmp_path):
    with pytest.raises(ValueError, match="no column 'words' \\(text_column\\)"):
        read_text_table(str(saved / "data.csv"), text_column="words")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine movie,0.5\n")
    with pytest.raises(ValueError, match="must hold integer class labels"):
        read_text_table(str(bad))
    with pytest.raises(FileNotFoundError, match="model directory .* does not exist"):
        load_classifier(str(tmp_path / "nope"))
    assert len(TextBatches(None, ["a"] * 33, torch.zeros(33, dtype=torch.long), batch_size=16)) == 3


def test_a_teacher_without_its_head_or_tokenizer_is_refused_naming_the_directory(saved, tmp_path):
    """A base model saved without its classifier was captured with a head drawn at random (a rerun then
    failed: another random head, another model_sha256); a folder without tokenizer files was captured
    with every word [UNK]; a tokenizer larger than the model's vocabulary ended in an IndexError
    traceback, and a max_length past the position table in a tensor-size error. Found by a walkthrough."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    teacher = BertForSequenceClassification.from_pretrained(str(saved / "teacher"))
    teacher.bert.save_pretrained(str(tmp_path / "base"))
    AutoTokenizer.from_pretrained(str(saved / "teacher")).save_pretrained(str(tmp_path / "base"))
    with pytest.raises(ValueError, match=r"model directory .*base lacks weights of the classifier \(classifier"):
        load_classifier(str(tmp_path / "base"))
    teacher.save_pretrained(str(tmp_path / "no_tokenizer"))
    with pytest.raises(FileNotFoundError, match=r"tokenizer directory .*no_tokenizer holds no tokenizer"):
        load_classifier(str(tmp_path / "no_tokenizer"))
    model, tokenizer = load_classifier(str(tmp_path / "no_tokenizer"), str(saved / "teacher"))  # --tokenizer
    assert len(tokenizer) == model.config.vocab_size
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(30)]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(tmp_path / "big"))
    with pytest.raises(ValueError, match=r"the tokenizer in .*big has 47 tokens, the model in .* a vocabulary of 17"):
        load_classifier(str(saved / "teacher"), str(tmp_path / "big"))
    long = tmp_path / "long.csv"
    long.write_text("text,label\ngood movie,1\n" + " ".join(["bad"] * 40) + ",0\n")
    with pytest.raises(ValueError, match=r"text row 1 is 42 tokens at max_length=64, more than the model's 32 "
                                         r"positions: pass max_length \(--max-length\) <= 32"):
        capture_text(str(saved / "teacher"), str(long), str(tmp_path / "cap"), max_length=64)
    # not given, max_length is 128 or the model's positions if fewer: the 32-position model's default was
    # refused for any text past 32 tokens (a session-64 walkthrough)
    assert capture_text(str(saved / "teacher"), str(long), str(tmp_path / "cap-default"),
                        dtype="float32")["n_rows"] == 2
    assert capture_text(str(saved / "teacher"), str(long), str(tmp_path / "cap-default"), max_length=32,
                        dtype="float32")["n_rows"] == 2  # the same rows: the default was 32
    assert main(["capture", "--model", str(tmp_path / "base"), "--data", str(saved / "data.csv"),
                 "--out", str(tmp_path / "cap2"), "--quiet"]) == 2


def test_fit_and_targets_commands_take_the_capture_directory(saved, tmp_path):
    cap = str(saved / "cap3")
    capture_text(str(saved / "teacher"), str(saved / "data.csv"), cap, dtype="float32", batch_size=16)
    proj = str(tmp_path / "p.safetensors")
    assert main(["fit", "--embeddings", cap, "--subclasses", "2", "--quiet", "--out", proj]) == 0
    p = LELPProjector.load(proj)
    assert p.head_weight is not None and p.null_space  # the capture's head was used
    assert main(["targets", "--projector", proj, "--embeddings", cap, "--out", str(tmp_path / "t"), "--quiet"]) == 0


def test_text_from_a_save_to_disk_directory(saved, tmp_path):
    """The layout datasets' save_to_disk writes (Arrow stream files listed in state.json), made here with
    pyarrow since the datasets package is not a dependency."""
    import json

    import pyarrow as pa

    texts, labels = read_text_table(str(saved / "data.csv"))
    directory = tmp_path / "ds"
    directory.mkdir()
    halves = [(0, 70), (70, len(texts))]
    for i, (a, b) in enumerate(halves):
        table = pa.table({"text": texts[a:b], "label": labels[a:b].tolist()})
        with pa.OSFile(str(directory / f"data-0000{i}-of-00002.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    (directory / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": f"data-0000{i}-of-00002.arrow"} for i in range(2)]}))
    got_texts, got_labels = read_text_table(str(directory))
    assert got_texts == texts and torch.equal(got_labels, labels)
    with pytest.raises(ValueError, match="no state.json"):
        read_text_table(str(tmp_path))


def test_lelp_trainer_works_with_data_collator_with_padding(saved, tmp_path):
    """Unpadded rows with a text column, padded per batch by DataCollatorWithPadding: the targets
    column is kept apart (it crashed the padding) through public hooks only."""
    from transformers import DataCollatorWithPadding, TrainingArguments

    from lelp_fast.train.hf import LELPTrainer, WithTargets

    assert "_set_signature_columns_if_needed" not in LELPTrainer.__dict__
    cap = str(saved / "cap3")
    capture_text(str(saved / "teacher"), str(saved / "data.csv"), cap, dtype="float32", batch_size=16)
    projector = LELPProjector(2, beta=0.5).fit(cap)
    generate_targets(projector, cap, str(tmp_path / "targets"), dtype="float32")
    _, tokenizer = load_classifier(str(saved / "teacher"))
    texts, labels = read_text_table(str(saved / "data.csv"))
    rows = [{**tokenizer(t), "labels": int(labels[i]), "text": t} for i, t in enumerate(texts)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_train_epochs=1,
                             learning_rate=5e-3, logging_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                             seed=0)
    trainer = LELPTrainer(model=tiny_bert(projector.n_outputs, seed=1), args=args,
                          train_dataset=WithTargets(rows, str(tmp_path / "targets")),
                          data_collator=DataCollatorWithPadding(tokenizer), lelp_loss=LELPLoss(projector))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and "loss_soft" in logged[0]


def test_trainer_example_from_the_store_runs(tmp_path):
    pytest.importorskip("datasets", reason="datasets is not installed (pip install 'lelp_fast[datasets]')")
    import os
    import subprocess
    import sys

    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                           "hf_trainer_from_store.py")
    out = subprocess.run([sys.executable, example, "--steps", "3", "--work-dir", str(tmp_path)], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    assert "plain KD (jsd) from stored logits" in out and "LELP (S=2) from stored targets" in out
    assert "exported classifier: [{'label': '" in out


def test_a_roberta_teachers_positions_less_its_padding_offset_bound_the_texts(saved, tmp_path):
    """RoBERTa-family embeddings number positions from padding_idx + 1: 34 positions hold 32 tokens.
    The default max_length (the model's positions, where fewer than 128) then ran past the table, an
    IndexError traceback deep in the forward (a review of session 64's default)."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2, max_position_embeddings=34, pad_token_id=1)
    RobertaForSequenceClassification(cfg).save_pretrained(str(tmp_path / "roberta"))
    AutoTokenizer.from_pretrained(str(saved / "teacher")).save_pretrained(str(tmp_path / "roberta"))
    long = tmp_path / "long.csv"
    long.write_text("text,label\ngood movie,1\n" + " ".join(["bad"] * 40) + ",0\n")
    model = str(tmp_path / "roberta")
    assert capture_text(model, str(long), str(tmp_path / "cap"), dtype="float32")["n_rows"] == 2
    with pytest.raises(ValueError, match=r"more than the model's 32 positions: pass max_length \(--max-length\) <= 32"):
        capture_text(model, str(long), str(tmp_path / "cap2"), max_length=40)


def test_with_targets_takes_the_temperatures_a_logits_store_is_read_at(tmp_path):
    """WithTargets took no beta or tau, so compact targets and a KD logits store failed at the first
    row with "pass beta and tau", arguments it did not have (a session-66 audit)."""
    from lelp_fast import TargetsDataset
    from lelp_fast.offline import store_teacher_outputs
    from lelp_fast.train.hf import WithTargets

    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    store_teacher_outputs(z, str(tmp_path / "kd"), dtype="float32")
    rows = [{"input_ids": [i]} for i in range(6)]
    with pytest.raises(ValueError, match="tau"):
        WithTargets(rows, str(tmp_path / "kd"))
    joined = WithTargets(rows, str(tmp_path / "kd"), tau=2.0)
    torch.testing.assert_close(joined[4]["lelp_targets"], torch.log_softmax(z[4] / 2.0, -1))
    assert torch.equal(joined[4]["lelp_targets"], TargetsDataset(str(tmp_path / "kd"), tau=2.0).targets([4])[0])


def test_a_csv_text_column_of_numbers_is_read_as_written(tmp_path):
    """pyarrow inferred the column's type: "007" and "1.50" became "7.0" and "1.5", "true" "True"
    (a session-66 audit)."""
    path = tmp_path / "data.csv"
    path.write_text("text,label\n007,0\n1.50,1\n")
    assert read_text_table(str(path))[0] == ["007", "1.50"]
    path.write_text("text,label\ntrue,0\nfalse,1\n")
    assert read_text_table(str(path))[0] == ["true", "false"]


def test_string_labels_given_to_capture_are_named(tmp_path):
    """A batch of string labels failed with torch's "too many dimensions 'str'" (a session-66 audit)."""
    from torch import nn

    from lelp_fast.capture import capture

    model = nn.Sequential(nn.Linear(4, 3))
    batches = [(torch.randn(2, 4), ["pos", "neg"])]
    with pytest.raises(ValueError, match=r"batch 0: labels must be integer class indices, got str \('pos'\)"):
        capture(model, batches, str(tmp_path / "cap"))
