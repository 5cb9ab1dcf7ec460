"""What verifying a capture's shards where they are read costs: fit and offline targets from a
capture directory, with ``CaptureSource(verify=True)`` (the default: the shard's checksum over the
bytes read for use, on first read; XXH3-128 since issue 20, sha256 before) against ``verify=False``
(sizes only, memory-mapped), in alternating rounds in one process, from the page cache (or, with
``--cold``, with the shards' pages evicted before every run: the offline-targets setting of
benchmarks/bench_offline_targets.py, where the read comes from disk); next to one plain read of the
shards, and that read with a sha256 and with an XXH3-128 pass.

Run: python benchmarks/bench_capture_verify.py [--rows 262144] [--dim 768] [--rounds 3] [--cold]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time

import torch
import xxhash
from bench_fit import evict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lelp_fast import LELPProjector, generate_targets
from lelp_fast.capture import CaptureSource, capture


def make_capture(directory: str, rows: int, dim: int) -> None:
    """A capture whose embeddings are the inputs of a linear head (fp16 shards of 16 batches)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=g) / dim ** 0.25
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Identity(), nn.Linear(dim, 2))
    capture(teacher, DataLoader(TensorDataset(x, y), batch_size=4096), directory, dtype="float16",
            batches_per_shard=16)


DIGESTS = {"sha256": lambda data: hashlib.sha256(data).hexdigest(), "xxh3_128": xxhash.xxh3_128_hexdigest}


def plain_read(directory: str, digest=None) -> None:
    for name in sorted(os.listdir(directory)):
        if name.startswith("shard-"):
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
            if digest:
                DIGESTS[digest](data)


def timed(fn, cold_dir=None) -> float:
    if cold_dir is not None:
        for name in os.listdir(cold_dir):
            if name.startswith("shard-"):
                evict(os.path.join(cold_dir, name))
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the shards' pages before every timed run")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="lelp_verify_", dir=os.path.expanduser("~"))  # a disk, not a tmpfs
    try:
        cap = os.path.join(work, "cap")
        make_capture(cap, args.rows, args.dim)
        projector = LELPProjector(8).fit(CaptureSource(cap, verify=False))
        times = {key: [] for key in ("read", "read+sha256", "read+xxh3_128", "fit verify", "fit no-verify", "targets verify",
                                     "targets no-verify")}
        for r in range(args.rounds):
            cold = cap if args.cold else None
            for digest in (None, "sha256", "xxh3_128"):
                times["read" + (f"+{digest}" if digest else "")].append(timed(lambda: plain_read(cap, digest), cold))
            for verify in (True, False):
                name = "verify" if verify else "no-verify"
                times[f"fit {name}"].append(timed(lambda: LELPProjector(8).fit(CaptureSource(cap, verify=verify)), cold))
                out = os.path.join(work, f"targets-{r}-{name}")
                times[f"targets {name}"].append(timed(lambda: generate_targets(
                    projector, CaptureSource(cap, verify=verify), out, dtype="float16"), cold))
                shutil.rmtree(out)
        gb = sum(os.path.getsize(os.path.join(cap, n)) for n in os.listdir(cap) if n.startswith("shard-")) / 1e9
        print(f"capture: {args.rows} x {args.dim} fp16, {gb:.2f} GB of shards, {'cold' if args.cold else 'page cache'}; "
              f"torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; medians of {args.rounds} rounds (min-max)\n")
        print("| run | median s | min-max s | GB/s |\n|---|---|---|---|")
        for key, values in times.items():
            med = statistics.median(values)
            print(f"| {key} | {med:.3f} | {min(values):.3f}-{max(values):.3f} | {gb / med:.2f} |")
        for job in ("fit", "targets"):
            ratio = statistics.median(times[f"{job} verify"]) / statistics.median(times[f"{job} no-verify"])
            print(f"\n{job}: verify / no-verify = {ratio:.3f}", end="")
        print()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
