"""Capture from a Hugging Face ``transformers`` classifier on a local text table (no download).

``capture_text`` loads a model saved with ``save_pretrained`` (and its tokenizer) from local
directories, reads a text column and a label column from a CSV or Parquet file, and runs
:func:`~lelp_fast.capture.capture` over tokenised batches: the embedding is the input of the
classifier head (the last ``nn.Linear``, e.g. BERT's pooled output), the logits the model's, and
the head's ``W, b`` are stored. ``lelp-fast capture`` is its command line.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Tuple

import torch

from .runner import capture


def read_text_table(path: str, text_column: str = "text",
                    label_column: str = "label") -> Tuple[List[str], torch.Tensor]:
    """(texts, integer labels) from a .csv or .parquet file, or a directory written by a Hugging Face
    ``datasets`` ``save_to_disk`` (its Arrow files, read with pyarrow: the ``datasets`` package is not
    needed); errors name the file and the column."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        table = _read_saved_dataset(path)
    elif ext == ".csv":
        import pyarrow as pa

        # the texts as written: type inference read a column of "007" and "1.50" as 7.0 and 1.5
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={text_column: pa.string()}))
    elif ext in (".parquet", ".pq"):
        table = pq.read_table(path)
    else:
        raise ValueError(f"data file {path}: unknown extension {ext!r} (use .csv, .parquet or a save_to_disk "
                         "directory)")
    for flag, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in table.column_names:
            raise ValueError(f"{path}: no column {column!r} ({flag}); it has {table.column_names}")
    texts = table.column(text_column).to_pylist()
    labels = table.column(label_column).to_pylist()
    for what, values in (("text", texts), ("label", labels)):
        bad = [i for i, v in enumerate(values) if v is None]
        if bad:
            raise ValueError(f"{path}: column {what!r} row {bad[0]} is null")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels):
        raise ValueError(f"{path}: column {label_column!r} must hold integer class labels")
    return [str(t) for t in texts], torch.tensor(labels, dtype=torch.int64)


def _read_saved_dataset(directory: str):
    """The table of a ``datasets`` ``save_to_disk`` directory: the Arrow stream files its
    ``state.json`` lists under ``_data_files``, in order."""
    import json

    import pyarrow as pa

    state_path = os.path.join(directory, "state.json")
    if not os.path.exists(state_path):
        raise ValueError(f"data directory {directory} has no state.json: not a datasets save_to_disk directory")
    with open(state_path) as f:
        files = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
    if not files:
        raise ValueError(f"{state_path} lists no _data_files")
    tables = []
    for name in files:
        with pa.memory_map(os.path.join(directory, name)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


class TextBatches:
    """Re-iterable tokenised batches ``(encoding dict, labels)`` in file order."""

    def __init__(self, tokenizer, texts: List[str], labels: torch.Tensor, batch_size: int = 32,
                 max_length: int = 128, positions: Optional[int] = None):
        self.tokenizer, self.texts, self.labels = tokenizer, texts, labels
        self.batch_size, self.max_length, self.positions = batch_size, max_length, positions

    def __len__(self) -> int:
        return (len(self.texts) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for start in range(0, len(self.texts), self.batch_size):
            stop = start + self.batch_size
            enc = self.tokenizer(self.texts[start:stop], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            if self.positions is not None and enc["input_ids"].shape[1] > self.positions:
                self._too_long(start, enc)
            yield dict(enc), self.labels[start:stop]

    def _too_long(self, start: int, enc) -> None:
        """A text longer than the model's position table (it failed deep in the forward, naming no row)."""
        lengths = enc["attention_mask"].sum(dim=1) if "attention_mask" in enc else None
        row = start + (int(torch.nonzero(lengths > self.positions)[0]) if lengths is not None else 0)
        raise ValueError(f"text row {row} is {enc['input_ids'].shape[1]} tokens at max_length={self.max_length}, more "
                         f"than the model's {self.positions} positions: pass max_length (--max-length) <= "
                         f"{self.positions}")


def load_classifier(model_dir: str, tokenizer_dir: Optional[str] = None):
    """(model, tokenizer) from local ``save_pretrained`` directories (never the hub). Refused, naming
    the directory: a model whose weights are not all in it (a base model saved without its classifier:
    transformers would draw the missing ones at random), a directory without tokenizer files
    (transformers would build one from the config alone, every word [UNK]), and a tokenizer with more
    tokens than the model's vocabulary (not its tokenizer: the embedding lookup would fail)."""
    from transformers import AutoModelForSequenceClassification

    from ..export.hf import TOKENIZER_FILES, holds_tokenizer, read_tokenizer

    tokenizer_dir = tokenizer_dir or model_dir
    for flag, path in (("model", model_dir), ("tokenizer", tokenizer_dir)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{flag} directory {path} does not exist")
    if not holds_tokenizer(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): "
                                "save the teacher's tokenizer there or pass tokenizer_dir= (--tokenizer DIR)")
    model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True,
                                                                     output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(f"model directory {model_dir} lacks weights of the classifier ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''}), which would be drawn at random: save the "
                         "fine-tuned sequence classifier itself with save_pretrained")
    tokenizer = read_tokenizer(tokenizer_dir, f"tokenizer directory {tokenizer_dir}")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens, the model in {model_dir} "
                         f"a vocabulary of {vocab}: it is not the model's tokenizer")
    return model, tokenizer


DEFAULT_MAX_LENGTH = 128


def capture_text(model_dir: str, data_path: str, out_dir: str, *, tokenizer_dir: Optional[str] = None,
                 text_column: str = "text", label_column: str = "label", batch_size: int = 32,
                 max_length: Optional[int] = None, **capture_kwargs) -> dict:
    """Captures a local transformers classifier over a text table; returns the manifest. ``max_length``
    (tokens a text keeps): by default 128, or the model's positions where it has fewer."""
    model, tokenizer = load_classifier(model_dir, tokenizer_dir)
    texts, labels = read_text_table(data_path, text_column, label_column)
    positions = _usable_positions(model)
    if max_length is None:
        max_length = DEFAULT_MAX_LENGTH if positions is None else min(DEFAULT_MAX_LENGTH, positions)
    batches = TextBatches(tokenizer, texts, labels, batch_size, max_length, positions)
    data = rows_fingerprint(texts, labels, tokenizer, batch_size=batch_size, max_length=max_length)
    return capture(model, batches, out_dir, data=data, **capture_kwargs)


def _usable_positions(model) -> Optional[int]:
    """Tokens a text may have: the position table's size, less the ids below padding_idx + 1 that
    RoBERTa-family embeddings skip (34 positions hold 32 tokens there); None where unknown."""
    positions = getattr(model.config, "max_position_embeddings", None)
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    offset = getattr(table, "padding_idx", None)
    return positions if positions is None or offset is None else positions - (offset + 1)


def rows_fingerprint(texts: List[str], labels: torch.Tensor, tokenizer, **batching) -> str:
    """What the captured rows are made from: the texts and labels, the tokenizer (its vocabulary and plain
    settings: what a library upgrade keeps, unlike its class name or serialised pipeline) and the batching
    (``max_length``, ``batch_size``: shards are runs of batches)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    h.update(labels.to(torch.int64).numpy().tobytes())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    # plain settings only (lower-casing, padding side, ...): an object's repr may hold its address
    settings = {k: v for k, v in tokenizer.init_kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))
                and k not in ("name_or_path", "vocab_file", "tokenizer_file")}
    settings.update(padding_side=getattr(tokenizer, "padding_side", None),
                    truncation_side=getattr(tokenizer, "truncation_side", None))
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(batching, sort_keys=True).encode())
    return h.hexdigest()[:16]
