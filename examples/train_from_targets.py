"""Distil a student from stored LELP targets, then the same with targets computed online.

A runnable example on scikit-learn's bundled digits (binary: even vs odd; no download):

1. train a teacher MLP and take its final-layer embeddings;
2. fit an LELPProjector and write the targets for every training row with
   ``generate_targets`` (what ``lelp-fast targets`` does on a large corpus);
3. train a student mini-batch by mini-batch from a ``TargetsDataset`` joined to the inputs;
4. train the same student with ``LELPLoss(projector)`` computing the targets from the teacher's
   embeddings inside the loss (no stored targets).

Run: python examples/train_from_targets.py [--epochs 60] [--work-dir DIR]
"""

import argparse
import tempfile

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lelp_fast import LELPLoss, LELPProjector, TargetsDataset, class_logits, collate_with_targets, generate_targets
from lelp_fast.quality import DATASETS, MLP


def train_teacher(x, y, epochs=300):
    torch.manual_seed(0)
    teacher = MLP(x.shape[1], 256, 2, 64)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher.eval()


def accuracy(student, x, y, n_subclasses):
    with torch.no_grad():
        return (class_logits(student(x), 2, n_subclasses).argmax(1) == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--subclasses", type=int, default=4)
    parser.add_argument("--work-dir", default=None, help="where the targets are written (default: a temp dir)")
    args = parser.parse_args()
    s = args.subclasses

    x, y, _ = DATASETS["digits-parity"]()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    test, train = perm[:700], perm[700:]
    teacher = train_teacher(x[train], y[train])
    with torch.no_grad():
        embeddings = teacher.embed(x[train])
    projector = LELPProjector(s).fit(embeddings, y[train], head_weight=teacher.head.weight.detach(),
                                     head_bias=teacher.head.bias.detach())

    # Offline: write the targets once, then train from them as often as needed.
    scratch = tempfile.TemporaryDirectory(prefix="lelp-targets-", dir=args.work_dir)
    out_dir = scratch.name
    generate_targets(projector, embeddings, out_dir, dtype="float16")
    data = TargetsDataset(out_dir, TensorDataset(x[train], y[train]))
    loader = DataLoader(data, batch_size=128, shuffle=True, collate_fn=collate_with_targets)
    torch.manual_seed(1)
    student = MLP(x.shape[1], 32, 2 * s)
    loss_fn = LELPLoss(projector)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(args.epochs):
        for (xb, yb), log_t in loader:
            opt.zero_grad()
            loss_fn(student(xb), log_t, yb).backward()
            opt.step()
    print(f"offline targets: student accuracy {accuracy(student, x[test], y[test], s):.4f}")

    # Online: the loss computes the targets from the teacher's embeddings in the same kernel.
    online = DataLoader(TensorDataset(x[train], embeddings), batch_size=128, shuffle=True)
    torch.manual_seed(1)
    student = MLP(x.shape[1], 32, 2 * s)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(args.epochs):
        for xb, hb in online:
            opt.zero_grad()
            loss_fn(student(xb), embeddings=hb).backward()
            opt.step()
    print(f"online targets: student accuracy {accuracy(student, x[test], y[test], s):.4f}")
    print(f"teacher accuracy {accuracy(teacher, x[test], y[test], 1):.4f}")
    scratch.cleanup()


if __name__ == "__main__":
    main()
