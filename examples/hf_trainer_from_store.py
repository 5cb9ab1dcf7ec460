"""Stored teacher outputs fed to a transformers ``Trainer`` through ``datasets``.

Everything is built from configs on the spot (a tiny BERT teacher and student, a word-level
tokenizer, synthetic sentences): no download. The store is read as a ``datasets.Dataset`` whose
Arrow columns are the memory-mapped shards, joined column-wise to the tokenised texts.

1. plain KD, TRL-style: the teacher's logits stored once (``store_teacher_outputs``), the student
   trained with the generalised JSD (``divergence="jsd"``, TRL's ``beta`` = our ``jsd_beta``);
2. LELP: the teacher's embeddings turned into subclass targets (``generate_targets``) and the
   student (C*S labels) trained with ``LELPTrainer``, then exported as a C-label classifier.

Run: python examples/hf_trainer_from_store.py [--steps 60] [--work-dir DIR]
"""

import argparse
import tempfile

import datasets
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, Trainer, TrainingArguments

from lelp_fast import LELPLoss, LELPProjector, TargetsDataset, generate_targets
from lelp_fast.io import ArraySource
from lelp_fast.offline import store_teacher_outputs
from lelp_fast.ops import distill_loss
from lelp_fast.train.hf import LELPTrainer

WORDS = ["good", "great", "fine", "bad", "awful", "boring", "movie", "plot", "the", "a", "is", "was"]
TAU = 2.0


def tiny_bert(num_labels, seed):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=num_labels, max_position_embeddings=32))


def texts_and_labels(n=256):
    g = torch.Generator().manual_seed(0)
    texts, labels = [], []
    for _ in range(n):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (6,), generator=g)]
        texts.append(" ".join(words))
        labels.append(int(sum(w in ("good", "great", "fine") for w in words) >= 2))
    return texts, labels


class JSDTrainer(Trainer):
    """KD from the stored logits column with the fused loss (generalised JSD, as TRL's GKD)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        log_t = torch.log_softmax(inputs.pop("teacher_logits").float() / TAU, dim=-1)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = distill_loss(outputs.logits, log_t, labels, num_classes=2, n_subclasses=1, divergence="jsd",
                            jsd_beta=0.5, tau=TAU)
        return (loss, outputs) if return_outputs else loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="lelp_hf_example_")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    texts, labels = texts_and_labels()
    tokenised = datasets.Dataset.from_dict({"text": texts, "labels": labels}).map(
        lambda b: tokenizer(b["text"], padding="max_length", max_length=12), batched=True).remove_columns("text")

    teacher = tiny_bert(2, seed=0).eval()  # stands in for a trained teacher
    enc = tokenizer(texts, padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        out = teacher(**enc, output_hidden_states=True)
        embeddings = teacher.bert.pooler(out.hidden_states[-1])  # the head's input
    logits = out.logits

    # 1. plain KD from stored logits
    store_teacher_outputs(logits, f"{work}/kd_store", dtype="float32")
    kd = TargetsDataset(f"{work}/kd_store", tau=TAU).to_hf_dataset()  # column teacher_logits, no copy
    train = datasets.concatenate_datasets([tokenised, kd], axis=1).with_format("torch")
    trainer = JSDTrainer(model=tiny_bert(2, seed=1), args=_args(work, "kd", args.steps), train_dataset=train)
    print(f"plain KD (jsd) from stored logits: final training loss {trainer.train().training_loss:.4f}")

    # 2. LELP targets from the embeddings, trained with LELPTrainer, exported with C labels
    projector = LELPProjector(2, beta=0.5).fit(embeddings, torch.tensor(labels),
                                               head_weight=teacher.classifier.weight.detach(),
                                               head_bias=teacher.classifier.bias.detach())
    generate_targets(projector, ArraySource(embeddings, torch.tensor(labels), logits), f"{work}/lelp", dtype="float32")
    lelp = TargetsDataset(f"{work}/lelp").to_hf_dataset()  # column log_targets
    train = datasets.concatenate_datasets([tokenised, lelp], axis=1).with_format("torch")
    student = tiny_bert(projector.n_outputs, seed=1)
    trainer = LELPTrainer(model=student, args=_args(work, "lelp", args.steps), train_dataset=train,
                          lelp_loss=LELPLoss(projector), targets_key="log_targets")
    print(f"LELP (S=2) from stored targets: final training loss {trainer.train().training_loss:.4f}")

    from lelp_fast.export.hf import export_hf

    export_hf(student, f"{work}/classifier", n_subclasses=2, tau=projector.tau, labels=["negative", "positive"],
              tokenizer=tokenizer)
    from transformers import pipeline

    print("exported classifier:", pipeline("text-classification", model=f"{work}/classifier")("good great movie"))


def _args(work, name, steps):
    return TrainingArguments(output_dir=f"{work}/{name}", per_device_train_batch_size=32, max_steps=steps,
                             learning_rate=5e-3, logging_steps=10, report_to=[], save_strategy="no", use_cpu=True,
                             seed=0, remove_unused_columns=False)  # keep the stored column for compute_loss


if __name__ == "__main__":
    main()
