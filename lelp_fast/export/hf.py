"""Stage 6 of the user's path for transformers students: a saved C-label classifier.

``export_hf(student, out_dir, labels=[…], n_subclasses=S, tau=τ)`` writes a ``save_pretrained``
directory of :class:`~lelp_fast.export.hf_pooled.LELPPooledForSequenceClassification`: the trained
student unchanged inside, the class pooling after it, ``id2label`` with the C class names, the
tokenizer when given, and ``hf_pooled.py`` named in ``auto_map`` for readers without lelp_fast
(``trust_remote_code=True``).
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Optional, Sequence

from .._checks import check_positive
from . import hf_pooled
from .hf_pooled import LELPPooledConfig, LELPPooledForSequenceClassification
from .module import unwrap

hf_pooled.register()


def _load_student(student):
    """The model: ``student`` itself unwrapped (DDP, ``torch.compile``), or read from its directory."""
    if not isinstance(student, (str, os.PathLike)):
        return unwrap(student)
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    if not os.path.isdir(student):
        raise FileNotFoundError(f"student {student}: no such directory (a save_pretrained output)")
    try:
        return AutoModelForSequenceClassification.from_pretrained(os.fspath(student), local_files_only=True)
    except (OSError, ValueError, SafetensorError) as exc:  # a damaged file, a bad config.json: one line naming it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"student {student}: cannot be loaded as a transformers classifier ({first}); "
                         "its weights or config are damaged or of another kind") from exc


def _class_names(labels: Optional[Sequence[str]], k: int, n_subclasses: int) -> list:
    if k % n_subclasses:
        raise ValueError(f"the student has {k} labels, not a multiple of n_subclasses={n_subclasses}")
    c = k // n_subclasses
    if labels is None:
        return [f"LABEL_{i}" for i in range(c)]
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ValueError(f"labels must be a list of the {c} class names, got {labels!r}")
    names = [str(x) for x in labels]
    if len(names) != c:
        raise ValueError(f"labels has {len(names)} names, but the student's {k} outputs / n_subclasses "
                         f"{n_subclasses} give {c} classes")
    if len(set(names)) != len(names):
        raise ValueError(f"labels must be distinct, got {names}")
    return names


def export_hf(student, out_dir: str, *, n_subclasses: int, tau: float = 1.0,
              labels: Optional[Sequence[str]] = None, tokenizer=None,
              remote_code: bool = True) -> LELPPooledForSequenceClassification:
    """Saves the C-label classifier around ``student`` (a model with C·S labels, or its directory).

    Args:
        student: a transformers sequence-classification model, or a ``save_pretrained`` directory.
        out_dir: where ``save_pretrained`` writes the classifier (created).
        n_subclasses: S; the class count is the student's label count / S.
        tau: the loss's τ (the pooling ``τ·logsumexp(s/τ)`` keeps the class distribution trained).
        labels: the C class names (default ``LABEL_i``).
        tokenizer: a tokenizer or its directory, saved alongside (what ``pipeline`` needs); a student
            directory's own tokenizer is used when this is None and it has one.
        remote_code: also write ``hf_pooled.py`` and ``auto_map`` for loaders without lelp_fast.
    """
    if not isinstance(n_subclasses, int) or n_subclasses < 1:
        raise ValueError(f"n_subclasses must be a positive integer, got {n_subclasses!r}")
    check_positive("tau", tau)
    source_dir = os.fspath(student) if isinstance(student, (str, os.PathLike)) else None
    model = _load_student(student)
    tokenizer = _resolve_tokenizer(tokenizer, source_dir)
    names = _class_names(labels, model.config.num_labels, n_subclasses)
    config = LELPPooledConfig(student_config=model.config, n_subclasses=n_subclasses, tau=tau,
                              id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    pooled = LELPPooledForSequenceClassification(config)
    pooled.student.load_state_dict(model.state_dict())
    if remote_code:
        pooled.config.auto_map = {"AutoConfig": "hf_pooled.LELPPooledConfig",
                                  "AutoModelForSequenceClassification": "hf_pooled.LELPPooledForSequenceClassification"}
    os.makedirs(out_dir, exist_ok=True)
    pooled.save_pretrained(out_dir)
    if remote_code:
        shutil.copyfile(hf_pooled.__file__, os.path.join(out_dir, "hf_pooled.py"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return pooled.eval()


def _resolve_tokenizer(tokenizer, source_dir: Optional[str]):
    """The tokenizer to save beside the classifier, read before anything is written: a directory given
    (--tokenizer) must hold one (a missing one went to the hub, after the model was written)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if not os.path.isdir(path) or not holds_tokenizer(path):
            raise FileNotFoundError(f"tokenizer {path} (--tokenizer): not a directory holding a saved tokenizer "
                                    f"({', '.join(TOKENIZER_FILES)})")
        return read_tokenizer(path, f"tokenizer {path} (--tokenizer)")
    if tokenizer is None and source_dir is not None:
        return _saved_tokenizer(source_dir)
    return tokenizer


# What save_pretrained writes of a tokenizer (one of them at least, by its kind).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def holds_tokenizer(directory: str) -> bool:
    """Whether ``directory`` holds a saved tokenizer's files (without them transformers builds one from
    a model's config alone, with no vocabulary)."""
    return any(os.path.exists(os.path.join(directory, name)) for name in TOKENIZER_FILES)


def read_tokenizer(directory: str, what: str):
    """The tokenizer saved in ``directory``, never from the hub; an unreadable one is one line naming ``what``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} cannot be read as a tokenizer ({first})") from None


def _saved_tokenizer(directory: str):
    """The tokenizer saved in a student's directory, or None (with a warning) where none is: transformers
    builds one from the model's config alone, with no vocabulary, that maps every word to [UNK]."""
    if holds_tokenizer(directory):
        try:
            return read_tokenizer(directory, directory)
        except ValueError:
            pass
    warnings.warn(f"{directory} holds no tokenizer: the classifier is saved without one; pass tokenizer= "
                  "(lelp-fast export --tokenizer DIR) for pipeline() to read text", UserWarning, stacklevel=4)
    return None
