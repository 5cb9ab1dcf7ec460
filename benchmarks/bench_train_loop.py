"""Step overhead of ``lelp_fast.train.distill`` over a plain PyTorch loop with the same loss.

Run: python benchmarks/bench_train_loop.py [--quick] [--rows 262144] [--batch 1024] [--csv out.csv]

Setup (issue 23): an MLP student 768 -> 256 -> 16 (C = 4, S = 4), targets stored as fp16 ``.npy``
shards by ``generate_targets``, inputs a ``TensorDataset`` of fp32 rows, AdamW, the fused loss
(KL, tau = 1, the library's default subclass weight λ in both), batch 1024. The peer is the loop a user writes by hand: the targets read into one
in-memory tensor first, a seeded permutation, slices, ``distill_loss``, backward, step. Both run
the same number of epochs from the same initial weights, taking turns within each repeat.

``distill`` also writes a checkpoint per epoch and a report (with a plot) at the end; the per-epoch
figure is the difference between an E-epoch and a 1-epoch run divided by E - 1, so fixed costs
(startup, report) are left out and the per-epoch checkpoint is kept in. Medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import shutil
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.utils.data import TensorDataset

import lelp_fast
from lelp_fast import LELPProjector, TargetsDataset, generate_targets
from lelp_fast.io import ArraySource
from lelp_fast.ops import distill_loss
from lelp_fast.train import TrainSettings, distill

C, S, D_IN, HIDDEN = 4, 4, 768, 256


def make_data(rows: int, workdir: str):
    """Inputs, labels and a targets directory (fp16 .npy shards) for ``rows`` rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, D_IN, generator=g)
    y = torch.randint(0, C, (rows,), generator=g)
    h = torch.randn(rows, 32, generator=g) + 3 * torch.nn.functional.one_hot(y, 32)[:, :32].float()
    projector = LELPProjector(S, beta=0.5).fit(h, y, num_classes=C)
    z = torch.randn(rows, C, generator=g)
    targets = os.path.join(workdir, "targets")
    shard_bytes = rows * 32 * 4 // 4  # 4 shards
    generate_targets(projector, ArraySource(h, y, z), targets, dtype="float16", chunk_bytes=shard_bytes)
    return x, y, targets


def student() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, C * S))


def plain_loop(x, y, log_t, epochs: int, batch: int) -> float:
    """The hand-written peer; returns seconds for ``epochs`` epochs."""
    model = student()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(epoch))
        for i in range(0, x.shape[0], batch):
            idx = order[i:i + batch]
            # subclass_weight=None: the library's default λ, the loss distill trains with
            loss = distill_loss(model(x[idx]), log_t[idx], y[idx], num_classes=C, n_subclasses=S,
                                subclass_weight=None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def library_loop(x, y, targets: str, epochs: int, batch: int, workdir: str) -> float:
    out = tempfile.mkdtemp(dir=workdir)
    start = time.perf_counter()
    distill(student(), TensorDataset(x, y), targets, out, num_classes=C, n_subclasses=S,
            settings=TrainSettings(epochs=epochs, batch_size=batch, tensorboard=False))
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def data_epoch(x, y, log_t, targets: str, batch: int, how: str) -> float:
    """Seconds to draw one epoch of batches, no model: where the loops differ."""
    from torch.utils.data import DataLoader, default_collate

    g = torch.Generator().manual_seed(0)
    ds = TargetsDataset(targets, TensorDataset(x, y))
    if how == "plain":
        loader = ((x[i], y[i], log_t[i]) for i in torch.randperm(x.shape[0], generator=g).split(batch))
    elif how == "rows":  # what distill did before the rework: rows, then default_collate
        loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=g, collate_fn=default_collate)
    else:  # what distill draws from: GatheredBatches, or batch_loader before it
        from lelp_fast.offline import batch_loader
        from lelp_fast.offline import dataset

        gathered = getattr(dataset, "GatheredBatches", batch_loader)
        if hasattr(ds, "read_into_memory"):
            ds.read_into_memory()  # as distill does for a store of this size
        loader = gathered(ds, batch, shuffle=True, generator=g)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def per_epoch(fns: dict, epochs: int, repeats: int) -> dict:
    """Seconds per epoch without fixed costs, (t(E) - t(1)) / (E - 1), one value per repeat for each
    loop; the loops take turns within each repeat, so a slow spell of the machine hits both."""
    for fn in fns.values():
        fn(1)  # warm-up: first-touch of the mapped shards, allocator, kernel dispatch
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append((fn(epochs) - fn(1)) / (epochs - 1))
    return out


def quantiles(values: list) -> tuple:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return statistics.median(values), pick(0.2), pick(0.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the long run (the short run has 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="32768 rows, 2 repeats")
    ap.add_argument("--csv", help="append the rows to this CSV file")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="No artists with labels")  # the report's plot of a run without validation
    if args.quick:
        args.rows, args.repeats = 32768, 2
    workdir = tempfile.mkdtemp(prefix="lelp_bench_loop_")
    try:
        x, y, targets = make_data(args.rows, workdir)
        log_t = TargetsDataset(targets).targets(range(args.rows))  # the peer reads the store once, up front
        data = {how: [data_epoch(x, y, log_t, targets, args.batch, how) for _ in range(args.repeats + 1)][1:]
                for how in ("plain", "rows", "gathered") if how != "gathered" or _has_batch_loader()}
        times = per_epoch({"plain": lambda e: plain_loop(x, y, log_t, e, args.batch),
                           "ours": lambda e: library_loop(x, y, targets, e, args.batch, workdir)},
                          args.epochs, args.repeats)
        plain, ours = times["plain"], times["ours"]
    finally:
        shutil.rmtree(workdir)
    report(args, plain, ours, data)


def _has_batch_loader() -> bool:
    import lelp_fast.offline

    return hasattr(lelp_fast.offline, "batch_loader")  # absent before the rework (the script also runs there)


def report(args, plain: list, ours: list, data: dict) -> None:
    p, o = quantiles(plain), quantiles(ours)
    shape = f"N={args.rows} B={args.batch} {D_IN}->{HIDDEN}->{C * S}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, "
          f"{shape}, fp16 targets, {args.repeats} repeats")
    print("| loop | s / epoch (median) | 20 % | 80 % | vs plain |")
    print("|---|---|---|---|---|")
    print(f"| plain PyTorch (targets in memory) | {p[0]:.3f} | {p[1]:.3f} | {p[2]:.3f} | 1.00 |")
    print(f"| lelp_fast distill | {o[0]:.3f} | {o[1]:.3f} | {o[2]:.3f} | {o[0] / p[0]:.2f} |")
    paired = sorted(b / a for a, b in zip(plain, ours))  # each repeat's ratio: the loops ran back to back
    print(f"| distill / plain per repeat (min, max; median) | | {paired[0]:.2f} | {paired[-1]:.2f} | "
          f"{statistics.median(paired):.2f} |")
    names = {"plain": "in-memory slices", "rows": "DataLoader rows + default_collate", "gathered": "distill's gathered batches"}
    for how, values in data.items():
        d = quantiles(values)
        print(f"| batches only: {names[how]} | {d[0]:.3f} | {d[1]:.3f} | {d[2]:.3f} | |")
    if args.csv:
        fresh = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.writer(f)
            if fresh:
                writer.writerow(["op", "backend", "mode", "shape", "dtype", "median", "q20", "q80", "floor", "peers",
                                 "device", "torch", "lelp_fast", "date"])
            writer.writerow(["train_loop", "distill", "full", shape, "float16", f"{o[0]:.4f}", f"{o[1]:.4f}",
                             f"{o[2]:.4f}", "", f"plain={p[0]:.4f}", "cpu", torch.__version__,
                             lelp_fast.__version__, datetime.date.today().isoformat()])


if __name__ == "__main__":
    main()
