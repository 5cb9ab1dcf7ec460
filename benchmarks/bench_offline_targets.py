"""Offline target generation benchmark: ``generate_targets`` vs a plain torch loop, next to the floor.

Run: python benchmarks/bench_offline_targets.py [--workdir /tmp/lelp_bench] [--chunk-mb 64 16]

Input: the synthetic Sentiment140-sized memmap of bench_fit.py (1.6 M x 768 fp16, 2 classes;
made if missing). Output: K = 16 fp16 log-targets (S = 8, class logits from a stored head).
Every run starts from a cold input file (pages evicted) and an empty output directory, in a
fresh process (peak RSS = its own VmHWM), one after another in the same invocation:
  floor  one plain read of the input (readinto, chunk by chunk) plus one write of the output
         bytes (N x K fp16) with fsync: the bytes that must move, at this machine's speed;
  lelp   lelp_fast.generate_targets (prefetching reader, fused CPU kernel, writer thread;
         .npy shards + manifest, fsynced);
  eager  the loop a user would write: np.load(mmap) slices -> torch fp32 addmm + log_softmax
         -> one np.save per chunk, no overlap, no fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from _timing import read_once
from bench_fit import S, SETS, evict, make_dataset, peak_rss_mb


def child(mode: str, path: str, projector_path: str, out: str, chunk_mb: float) -> dict:
    from lelp_fast import LELPProjector, generate_targets
    from lelp_fast.io import NpySource

    chunk_bytes = int(chunk_mb * (1 << 20))
    projector = LELPProjector.load(projector_path)
    n, d = np.load(path, mmap_mode="r").shape
    k = projector.n_outputs
    t0 = time.perf_counter()
    if mode == "floor":
        read_once(path, chunk_bytes)
        os.makedirs(out, exist_ok=True)
        block = np.zeros(max(1, chunk_bytes // (d * 2)) * k, dtype=np.float16).tobytes()
        left = n * k * 2
        with open(os.path.join(out, "floor.bin"), "wb") as f:
            while left > 0:
                left -= f.write(block[: min(left, len(block))])
            f.flush()
            os.fsync(f.fileno())
    elif mode == "lelp":
        generate_targets(projector, NpySource(path), out, dtype="float16", chunk_bytes=chunk_bytes)
    else:  # eager
        arr = np.load(path, mmap_mode="r")
        weight, bias = projector.fused_map(with_head=True)
        os.makedirs(out, exist_ok=True)
        rows = max(1, chunk_bytes // (d * 2))
        for i, start in enumerate(range(0, n, rows)):
            h = torch.from_numpy(np.array(arr[start:start + rows])).float()
            proj = torch.addmm(bias, h, weight)
            u, z = proj[:, :k], proj[:, k:]
            log_class = torch.log_softmax(z / projector.tau, -1)
            log_sub = torch.log_softmax(u.reshape(-1, projector.num_classes, S) / projector.beta, -1)
            log_t = (log_sub + log_class.unsqueeze(-1)).reshape(-1, k)
            np.save(os.path.join(out, f"shard-{i:06d}.npy"), log_t.half().numpy())
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def run_child(mode: str, path: str, projector_path: str, out: str, chunk_mb: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    evict(path)
    res = subprocess.run([sys.executable, __file__, "--child", mode, "--path", path, "--projector", projector_path,
                          "--out", out, "--chunk-mb", str(chunk_mb)], capture_output=True, text=True, check=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def make_projector(path: str, projector_path: str) -> None:
    from lelp_fast import LELPProjector

    if os.path.exists(projector_path):
        return
    arr = np.load(path, mmap_mode="r")
    labels = np.load(path + ".labels.npy")
    h = torch.from_numpy(np.array(arr[:200_000])).float()
    g = torch.Generator().manual_seed(0)
    head_w = torch.randn(2, h.shape[1], generator=g) / h.shape[1] ** 0.5
    LELPProjector(S).fit(h, torch.from_numpy(labels[:200_000]), head_weight=head_w,
                         head_bias=torch.zeros(2)).save(projector_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lelp_bench")
    parser.add_argument("--chunk-mb", type=float, nargs="+", default=[64.0, 16.0])
    parser.add_argument("--child")
    parser.add_argument("--path")
    parser.add_argument("--projector")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.projector, args.out, args.chunk_mb[0])))
        return
    n, d, num_classes = SETS["sentiment"]
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, f"sentiment_{n}x{d}_fp16.npy")
    make_dataset(path, n, d, num_classes)
    projector_path = os.path.join(args.workdir, "sentiment_projector.safetensors")
    make_projector(path, projector_path)
    out = os.path.join(args.workdir, "targets_out")
    print(f"machine: {os.uname().machine}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"input {n} x {d} fp16 ({n * d * 2 / 1e9:.2f} GB), output {n} x {num_classes * S} fp16 "
          f"({n * num_classes * S * 2 / 1e6:.0f} MB)")
    print("| chunk (MiB) | run | seconds | x floor | rows/s | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for chunk_mb in args.chunk_mb:
        floor = None
        for mode in ("floor", "lelp", "eager"):
            r = run_child(mode, path, projector_path, out, chunk_mb)
            floor = r["seconds"] if mode == "floor" else floor
            print(f"| {chunk_mb:g} | {mode} | {r['seconds']:.2f} | {r['seconds'] / floor:.2f}x | "
                  f"{n / r['seconds'] / 1e6:.2f} M | {r['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
