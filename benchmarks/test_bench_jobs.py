"""The jobs against their peers: the fit (exact covariance and Nyström sketch) against
scikit-learn's IncrementalPCA and randomized PCA, the k-means subclasses on faiss, and the
targets of a capture directory with and without the sha256 verification on read; each next to a
plain read of the same data. ``pytest benchmarks/test_bench_jobs.py --benchmark-only``."""

import os

import numpy as np
import pytest
import torch

from lelp_fast import LELPProjector, generate_targets

D, C, S = 768, 2, 8


@pytest.fixture(scope="module")
def embeddings(scale, tmp_path_factory):
    """Class-structured fp32 rows (a decaying spectrum per class), as a .npy file and in memory."""
    n = max(2048, int(262144 * scale))
    g = np.random.default_rng(0)
    y = g.integers(0, C, n)
    spectrum = (1.0 / np.arange(1, D + 1)) ** 0.5
    h = (g.standard_normal((n, D), dtype=np.float32) * spectrum.astype(np.float32)) + y[:, None].astype(np.float32)
    path = str(tmp_path_factory.mktemp("jobs") / "h.npy")
    np.save(path, h)
    return {"h": h, "y": y, "path": path, "n": n}


def _once(benchmark, fn):
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("who", ["lelp_fast-exact", "lelp_fast-nystrom", "sklearn-incremental-pca",
                                 "sklearn-randomized-pca", "floor"])
def test_fit(benchmark, embeddings, who):
    h, y, n = embeddings["h"], embeddings["y"], embeddings["n"]
    benchmark.group = f"fit N={n} d={D} C={C} S={S} fp32 .npy"
    if who == "floor":
        return _once(benchmark, lambda: np.load(embeddings["path"]).sum())
    if who.startswith("lelp_fast"):
        method = who.split("-")[1]
        return _once(benchmark, lambda: LELPProjector(S, method=method).fit(embeddings["path"], y))
    from sklearn.decomposition import PCA, IncrementalPCA

    def per_class():
        for c in range(C):
            rows = h[y == c]
            if who == "sklearn-incremental-pca":
                IncrementalPCA(n_components=S, batch_size=max(S + 1, len(rows) // 16)).fit(rows)
            else:
                PCA(n_components=S, svd_solver="randomized", random_state=0).fit(rows)

    _once(benchmark, per_class)


@pytest.mark.parametrize("who", ["lelp_fast-faiss-kmeans"])
def test_kmeans_subclasses(benchmark, embeddings, who):
    pytest.importorskip("faiss")
    from lelp_fast.methods import KMeansSubclasses

    benchmark.group = f"k-means subclasses N={embeddings['n']} d={D} C={C} S={S}"
    h, y = torch.from_numpy(embeddings["h"]), torch.from_numpy(embeddings["y"])
    _once(benchmark, lambda: KMeansSubclasses(S).fit(h, y, C))


@pytest.mark.parametrize("who", ["lelp_fast-verify", "lelp_fast-no-verify"])
def test_targets_from_a_capture(benchmark, embeddings, tmp_path_factory, who):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lelp_fast.capture import CaptureSource, capture

    base = tmp_path_factory.getbasetemp()
    cap = os.path.join(base, "cap")
    if not os.path.exists(os.path.join(cap, "manifest.json")):
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Identity(), nn.Linear(D, C))
        rows = TensorDataset(torch.from_numpy(embeddings["h"]), torch.from_numpy(embeddings["y"]))
        capture(teacher, DataLoader(rows, batch_size=4096), cap, dtype="float16", batches_per_shard=16)
    projector = LELPProjector(S).fit(CaptureSource(cap, verify=False))
    benchmark.group = f"targets from a capture N={embeddings['n']} d={D} fp16"
    runs = iter(range(1000))

    def job():
        out = os.path.join(base, f"targets-{who}-{next(runs)}")
        generate_targets(projector, CaptureSource(cap, verify=who == "lelp_fast-verify"), out)

    job()  # untimed: the session's first job pays one-time costs (thread pools, the shards' first read)
    _once(benchmark, job)
