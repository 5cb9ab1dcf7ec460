"""Fashion-MNIST, coarse: classes 0-4 vs 5-9, so each class is a union of 5 real ones (subclasses).

The data come from the Debian package ``dataset-fashion-mnist`` (gzipped IDX files under
``/usr/share/datasets/fashion-mnist/``; nothing is downloaded). :func:`task` builds what
``lelp-fast run`` needs: a small CNN teacher trained on the coarse labels (trained once per
n_train, teacher_epochs, seed and data_dir, then loaded from ``<work_dir>/teacher.safetensors``), the
train / validation / test splits, and the
student (linear on the pixels, or a small MLP).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .._checks import check_count
from ..io.integrity import tensors_sha256

DATA_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "install it with: apt-get install dataset-fashion-mnist (Debian/Ubuntu)"


def read_idx(path: str) -> np.ndarray:
    """A gzipped IDX file (the MNIST format) as an array."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Fashion-MNIST file {path} is missing; {INSTALL_HINT}")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    dims = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(split: str, data_dir: str = DATA_DIR):
    """(images (N, 1, 28, 28) fp32 in [0, 1], fine labels (N,) int64) of "train" or "t10k"."""
    images = read_idx(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def coarse(fine: torch.Tensor) -> torch.Tensor:
    """0-4 (T-shirt, trouser, pullover, dress, coat) -> 0; 5-9 (sandal, shirt, sneaker, bag, boot) -> 1."""
    return (fine >= 5).long()


class CNN(nn.Module):
    """The teacher: two conv blocks, a 64-d embedding, a linear head (what capture hooks)."""

    def __init__(self, num_classes: int = 2, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 7 * 7, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


STUDENTS = ("linear", "mlp")


def make_student(kind: str, n_outputs: int) -> nn.Module:
    """"linear" (the pixels straight to C*S logits) or "mlp" (one hidden layer of 32)."""
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, n_outputs))
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, n_outputs))
    raise ValueError(f"task.kwargs.student must be 'linear' or 'mlp', got {kind!r}")


def train_teacher(train: TensorDataset, epochs: int, seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    model = CNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@dataclasses.dataclass
class Task:
    """What the pipeline needs from a task: the teacher, the splits ((x, y) datasets in a fixed
    order), C, and a student factory taking K = C*S."""

    teacher: nn.Module
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    make_student: Callable[[int], nn.Module]


def task(work_dir: str, n_train: int = 10000, n_val: int = 2000, n_test: Optional[int] = None,
         teacher_epochs: int = 3, student: str = "linear", data_dir: str = DATA_DIR, seed: int = 0) -> Task:
    """Fashion-MNIST coarse: the first ``n_train`` training images for training, the next ``n_val`` for
    validation, the test set (or its first ``n_test``) for the final report."""
    from safetensors.torch import save

    from ..offline import shards
    from ..train.loop import data_digest

    if student not in STUDENTS:  # named now, not after the capture, fit and targets have run
        raise ValueError(f"task.kwargs.student must be 'linear' or 'mlp', got {student!r}")
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("teacher_epochs", teacher_epochs)):
        if value is not None:  # each split is used (the test split by the report, after every stage)
            check_count(f"task.kwargs.{name}", value)
    x, fine = load("train", data_dir)
    if n_train + n_val > x.shape[0]:
        raise ValueError(f"task.kwargs.n_train + task.kwargs.n_val must be <= {x.shape[0]}, got {n_train + n_val}")
    y = coarse(fine)
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train:n_train + n_val], y[n_train:n_train + n_val])
    xt, ft = load("t10k", data_dir)
    n_test = xt.shape[0] if n_test is None else n_test
    test = TensorDataset(xt[:n_test], coarse(ft[:n_test]))
    path = os.path.join(work_dir, "teacher.safetensors")
    # what the teacher is trained from: a cached one made from other settings or rows (or one written
    # before session 66, which recorded the data's directory, not its rows) is trained again
    made_from = {"n_train": str(n_train), "teacher_epochs": str(teacher_epochs), "seed": str(seed),
                 "train_rows": data_digest(train)}
    teacher = _cached_teacher(path, made_from)
    if teacher is None:
        teacher = train_teacher(train, teacher_epochs, seed)
        os.makedirs(work_dir, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in teacher.state_dict().items()}
        # one metadata key (safetensors writes several in hash order): the same teacher, the same bytes
        record = json.dumps({**made_from, "tensors_sha256": tensors_sha256(tensors)}, sort_keys=True)
        shards.write_atomically(path, save(tensors, metadata={"teacher": record}))
    return Task(teacher, train, val, test, 2, lambda k: make_student(student, k))


def _cached_teacher(path: str, made_from: dict) -> Optional[nn.Module]:
    """The teacher cached at ``path`` when it was made from ``made_from`` and its tensors pass their
    checksum; else None (it is trained again: a damaged cache warns)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            record = json.loads((f.metadata() or {}).get("teacher", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on a damaged file
        warnings.warn(f"{path} is unreadable ({exc}); training the teacher again", RuntimeWarning, stacklevel=3)
        return None
    claimed = record.pop("tensors_sha256", None)
    if record != made_from:  # other settings, or written before session 65 (no checksum): trained again
        return None
    if claimed != tensors_sha256(tensors):
        warnings.warn(f"{path} fails its sha256 checksum (corrupt); training the teacher again", RuntimeWarning,
                      stacklevel=3)
        return None
    teacher = CNN()
    teacher.load_state_dict(tensors)
    return teacher.eval()
