"""A run config's task small enough for tests of the whole path (``task.factory: tiny_task:task``):
a 3-class MLP teacher on 600 random rows, a linear or MLP student."""

import dataclasses
from typing import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset


@dataclasses.dataclass
class Task:
    teacher: nn.Module
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    make_student: Callable[[int], nn.Module]


def make_student(kind: str, k: int) -> nn.Module:
    torch.manual_seed(1)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, k))
    return nn.Linear(10, k)


EDITED = set()  # splits whose inputs a test has edited (by 1 %) without changing the task's kwargs


def task(work_dir: str, student: str = "linear", teacher_seed: int = 0, unlabelled_test_every: int = 0) -> Task:
    """``unlabelled_test_every`` n: every n-th test row is labelled -100 (no label)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 10, generator=g)
    y = (x[:, 0] > 0.4).long() + (x[:, 1] > 0.4).long()
    torch.manual_seed(teacher_seed)
    teacher = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    splits = [TensorDataset(x[a:b], y[a:b].clone()) for a, b in ((0, 400), (400, 500), (500, 600))]
    for i, name in enumerate(("train", "val", "test")):
        if name in EDITED:
            splits[i] = TensorDataset(splits[i].tensors[0] * 1.01, splits[i].tensors[1])
    if unlabelled_test_every:
        splits[2].tensors[1][::unlabelled_test_every] = -100
    return Task(teacher.eval(), *splits, 3, lambda k: make_student(student, k))
