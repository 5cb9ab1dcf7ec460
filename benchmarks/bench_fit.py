"""Fit benchmark: lelp_fast's streaming fit vs scikit-learn, torch and faiss, next to the read floor.

Run: python benchmarks/bench_fit.py [--workdir /tmp/lelp_bench] [--sets sentiment amazon]

Data sets (synthetic fp16 memmaps, regenerated if missing, each class with a 1/i spectrum):
  sentiment: 1.6 M x 768, 2 classes (Sentiment140-sized);  amazon: 500 k x 1024, 5 classes.
S = 8 subclasses. Every lelp_fast run and the read floor start from a cold file (its pages evicted
with posix_fadvise DONTNEED) and run in a fresh process so that peak RSS is its own. The floor is
the faster of two cold reads, one before and one after lelp_fast's runs (the disk's speed drifts).
Peers (in-memory, per class, on fp32 data that is loaded first; load time reported separately):
scikit-learn PCA(svd_solver="randomized"), torch.pca_lowrank, faiss PCAMatrix, and scikit-learn
IncrementalPCA on a prefix of the rows (its time scaled linearly to N: it is linear in N).
Quality: captured variance of each method's per-class subspace divided by the optimum (exact fp64
eigenvectors of the class covariance from lelp_fast's exact statistics).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from _timing import read_once

from lelp_fast.fit.engine import choose_method

SETS = {"sentiment": (1_600_000, 768, 2), "amazon": (500_000, 1024, 5)}
S = 8
MODES = ("exact:1", "nystrom:1", "nystrom:3")


def make_dataset(path: str, n: int, d: int, num_classes: int, seed: int = 0) -> None:
    if os.path.exists(path) and os.path.exists(path + ".labels.npy"):
        return
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    bases = [np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32) for _ in range(num_classes)]
    means = rng.standard_normal((num_classes, d)).astype(np.float32)
    scales = (np.arange(1, d + 1, dtype=np.float32) ** -0.5)
    out = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=np.float16, shape=(n, d))
    step = 100_000
    for start in range(0, n, step):
        y = labels[start:start + step]
        z = rng.standard_normal((y.shape[0], d), dtype=np.float32) * scales
        block = np.empty_like(z)
        for c in range(num_classes):
            m = y == c
            block[m] = z[m] @ bases[c].T + means[c]
        out[start:start + step] = block.astype(np.float16)
    out.flush()
    del out
    np.save(path + ".labels.npy", labels)
    os.replace(path + ".tmp.npy", path)


def evict(path: str) -> None:
    """Drops the file's pages from the page cache so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(mode: str, path: str, chunk_mb: float) -> dict:
    """One measured run in this (fresh) process."""
    from lelp_fast import LELPProjector

    t0 = time.perf_counter()
    if mode == "read":  # the floor: read every byte once, chunk by chunk, into one buffer
        read_once(path, int(chunk_mb * (1 << 20)))
        result = {}
    else:
        method, passes = mode.split(":")
        p = LELPProjector(S, method=method, passes=int(passes), rotate=False)
        p.fit(path, path + ".labels.npy", chunk_bytes=int(chunk_mb * (1 << 20)))
        result = {"directions": p.A.double().reshape(p.dim, p.num_classes, S).permute(1, 0, 2).tolist()}
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: on Linux ru_maxrss survives fork + exec, so a
    child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(mode: str, path: str, chunk_mb: float) -> dict:
    evict(path)
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--path", path, "--chunk-mb", str(chunk_mb)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def exact_covariances(path: str, num_classes: int):
    from lelp_fast.fit.bucket import bucket_rows
    from lelp_fast.fit.exact import ExactClassStatistics

    arr = np.load(path, mmap_mode="r")
    labels = np.load(path + ".labels.npy")
    stats = None
    for start in range(0, arr.shape[0], 50_000):
        h = torch.from_numpy(np.array(arr[start:start + 50_000]))
        y = torch.from_numpy(labels[start:start + 50_000])
        if stats is None:
            shift = torch.stack([h[y == c].double().mean(0) for c in range(num_classes)])
            stats = ExactClassStatistics(num_classes, arr.shape[1], shift)
        stats.update(*bucket_rows(h, y, stats.shift, num_classes)[:3])
    return stats.moments()[1]


def captured(directions: np.ndarray, cov: torch.Tensor) -> float:
    v, _ = torch.linalg.qr(torch.as_tensor(directions, dtype=torch.float64))
    best = torch.linalg.eigvalsh(cov).flip(0)[: v.shape[1]].sum()
    return float(torch.trace(v.T @ cov @ v) / best)


def peers(path: str, num_classes: int, covs, ipca_rows: int):
    """In-memory peers per class; returns rows of (name, seconds, captured, note)."""
    import faiss
    from sklearn.decomposition import PCA, IncrementalPCA

    arr = np.load(path, mmap_mode="r")
    labels = np.load(path + ".labels.npy")
    n = arr.shape[0]
    evict(path)
    t0 = time.perf_counter()
    data = np.asarray(arr, dtype=np.float32)
    load = time.perf_counter() - t0
    per_class = [np.ascontiguousarray(data[labels == c]) for c in range(num_classes)]
    del data
    rows = [("load fp16 memmap -> fp32 in RAM (cold)", load, None, "needed by every in-memory peer")]

    def timed(name, fit_one, note=""):
        t = time.perf_counter()
        dirs = [fit_one(x) for x in per_class]
        rows.append((name, time.perf_counter() - t, min(captured(v, covs[c]) for c, v in enumerate(dirs)), note))

    timed("scikit-learn PCA(svd_solver='randomized')",
          lambda x: PCA(S, svd_solver="randomized", random_state=0).fit(x).components_.T)
    timed("torch.pca_lowrank (q=S+10, niter=2)",
          lambda x: torch.pca_lowrank(torch.from_numpy(x), q=S + 10, center=True, niter=2)[2][:, :S].numpy())

    def faiss_fit(x):
        pca = faiss.PCAMatrix(x.shape[1], S)
        pca.train(x)
        return faiss.vector_to_array(pca.PCAMat).reshape(x.shape[1], x.shape[1])[:S].T

    timed("faiss PCAMatrix", faiss_fit)
    frac = min(1.0, ipca_rows / n)
    t = time.perf_counter()
    dirs = []
    for x in per_class:
        m = max(S + 1, int(x.shape[0] * frac))
        ipca = IncrementalPCA(S, batch_size=max(S + 1, 8192)).fit(x[:m])
        dirs.append(ipca.components_.T)
    took = (time.perf_counter() - t) / frac
    rows.append(("scikit-learn IncrementalPCA", took, min(captured(v, covs[c]) for c, v in enumerate(dirs)),
                 f"run on {100 * frac:.1f}% of rows, time scaled x{1 / frac:.1f}; quality from that prefix"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--path")
    ap.add_argument("--workdir", default="/tmp/lelp_bench")
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--chunk-mb", type=float, default=64)
    ap.add_argument("--ipca-rows", type=int, default=200_000)
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.chunk_mb)))
        return

    os.makedirs(args.workdir, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, S={S}, chunk {args.chunk_mb} MiB")
    for name in args.sets:
        n, d, num_classes = SETS[name]
        path = os.path.join(args.workdir, f"{name}_{n}x{d}_fp16.npy")
        make_dataset(path, n, d, num_classes)
        size_gb = os.path.getsize(path) / 1e9
        covs = exact_covariances(path, num_classes)
        floor_before = run_child("read", path, args.chunk_mb)["seconds"]
        ours = {}
        for mode in MODES:
            ours[mode] = run_child(mode, path, args.chunk_mb)
        floor_after = run_child("read", path, args.chunk_mb)
        # The faster of two cold reads, one before and one after our runs (disk speed drifts).
        floor = min(floor_before, floor_after["seconds"])
        auto = choose_method("auto", d, num_classes, n_rows=n)
        print(f"\n### {name}: {n} x {d} fp16 ({size_gb:.2f} GB), {num_classes} classes\n")
        print("| method | seconds | vs read floor | captured variance (min over classes) | peak RSS (MB) | note |")
        print("|---|---|---|---|---|---|")
        print(f"| plain read pass (floor) | {floor:.2f} | 1.00x | — | {floor_after['peak_rss_mb']:.0f} "
              f"| {size_gb / floor:.2f} GB/s cold; reads before / after: {floor_before:.2f} / "
              f"{floor_after['seconds']:.2f} s |")
        for mode, r in ours.items():
            cap = min(captured(np.array(r["directions"][c]), covs[c]) for c in range(num_classes))
            method, passes = mode.split(":")
            default = " = auto (default)" if method == auto and (method == "exact" or passes == "3") else ""
            print(f"| lelp_fast {label(mode)}{default} | {r['seconds']:.2f} | {r['seconds'] / floor:.2f}x | {cap:.4f} "
                  f"| {r['peak_rss_mb']:.0f} | streaming, cold |", flush=True)
        if args.no_peers:
            continue
        for peer, seconds, cap, note in peers(path, num_classes, covs, args.ipca_rows):
            cap_s = "—" if cap is None else f"{cap:.4f}"
            vs = " / ".join(f"{seconds / ours[m]['seconds']:.1f}x" for m in MODES)
            print(f"| {peer} | {seconds:.2f} | {seconds / floor:.2f}x | {cap_s} | (in-process) "
                  f"| {note}{'; ' if note else ''}{vs} vs {' / '.join(label(m) for m in MODES)} |", flush=True)


def label(mode: str) -> str:
    method, passes = mode.split(":")
    return method if method == "exact" else f"{method} ({passes} pass)"

if __name__ == "__main__":
    main()
