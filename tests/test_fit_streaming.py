"""The streaming fit engine: sources, exact vs sketch accuracy, chunking, resume, bad input."""

import os

import numpy as np
import pytest
import torch

from lelp_fast import LELPProjector, reference
from lelp_fast.fit.bucket import bucket_rows
from lelp_fast.fit.engine import choose_method, iteration_stride
from lelp_fast.fit.exact import top_eigenpairs_of
from lelp_fast.fit.exact import ExactClassStatistics
from lelp_fast.fit.sketch import SketchClassStatistics
from lelp_fast.io import IterableSource, NpySource, ParquetSource, SafetensorsSource
from lelp_fast.io.sources import ArraySource, wanted
from lelp_fast.ops import _dispatch
from conftest import make_problem


def decaying_problem(n=4000, d=64, num_classes=2, seed=0, power=1.0):
    """Per-class data with a 1/i^power spectrum in a random basis, shifted far from the origin."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    h = torch.empty(n, d, dtype=torch.float64)
    for c in range(num_classes):
        basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        scales = torch.arange(1, d + 1, dtype=torch.float64) ** (-power / 2)
        rows = int((y == c).sum())
        h[y == c] = (torch.randn(rows, d, generator=g, dtype=torch.float64) * scales) @ basis.T + 5.0 * torch.randn(
            d, generator=g, dtype=torch.float64
        )
    return h, y


def captured_ratio(projector_a_directions, covs, s):
    """trace(Vᵀ Σ V) / (sum of the top-S eigenvalues of Σ), per class."""
    out = []
    for c in range(covs.shape[0]):
        v, _ = torch.linalg.qr(projector_a_directions[c])
        got = torch.trace(v.T @ covs[c] @ v)
        best = torch.linalg.eigvalsh(covs[c]).flip(0)[:s].sum()
        out.append(float(got / best))
    return out


def fitted_directions(p):
    """The class subspaces spanned by the columns of A (C x d x S)."""
    return p.A.double().reshape(p.dim, p.num_classes, p.n_subclasses).permute(1, 0, 2)


# ------------------------------------------------------------------ the bucketing kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if _dispatch.available("cpu", torch.device("cpu")) else []))
def test_bucket_rows_matches_reference(dtype, backend):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(203, 37, generator=g).to(dtype)
    y = torch.randint(0, 3, (203,), generator=g)
    y[:5] = 2
    shift = torch.randn(3, 37, generator=g, dtype=torch.float64)
    workspace = torch.full((203 * 37 + 11,), float("nan"))  # poisoned
    x, counts, sums, bad = bucket_rows(h, y, shift, 3, backend, workspace)
    assert bad is None
    assert counts.tolist() == [int((y == c).sum()) for c in range(3)]
    start = 0
    for c in range(3):
        want = h[y == c].double() - shift[c].float().double()  # in input order: the sort is stable
        torch.testing.assert_close(x[start:start + counts[c]].double(), want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sums[c], want.sum(0), atol=1e-4, rtol=1e-6)
        start += counts[c]
    h[17, 3] = float("nan")
    h[150, 36] = float("inf")
    h[151, 0] = float("-inf")
    assert torch.nonzero(bucket_rows(h, y, shift, 3, backend, workspace).bad).flatten().tolist() == [17, 150, 151]
    y[77] = 3
    with pytest.raises(ValueError, match=r"labels\[77\] = 3 is out of range"):
        bucket_rows(h, y, shift, 3, backend)


@pytest.mark.skipif(not _dispatch.available("cpu", torch.device("cpu")), reason="needs the C++ extension")
@pytest.mark.parametrize("n, d, k", [(1, 8, 3), (203, 37, 5), (130, 40, 18), (301, 64, 24), (97, 24, 21)])
def test_fused_sketch_update_matches_the_fp64_products(n, d, k):
    g = torch.Generator().manual_seed(n + d + k)
    x = torch.randn(n, d, generator=g) + 3.0
    counts = torch.tensor([n // 3, 0, n - n // 3])  # a class without rows in this chunk
    shift = torch.zeros(3, d, dtype=torch.float64)
    sums = torch.zeros(3, d, dtype=torch.float64)
    got = SketchClassStatistics(3, d, shift, k, seed=1, backend="cpu")
    got.y.fill_(0.5)  # accumulates: the state before the update is kept
    got.update(x, counts, sums)
    start = 0
    for c, n_c in enumerate(counts.tolist()):
        xc = x[start:start + n_c].double()
        want_y = 0.5 + xc.T @ (xc @ got.omega[c].float().double())
        torch.testing.assert_close(got.y[c], want_y, rtol=1e-5, atol=1e-5 * float(want_y.abs().max()))
        torch.testing.assert_close(got.sumsq[c], (xc * xc).sum(), rtol=1e-6, atol=0)
        start += n_c


# ------------------------------------------------------------------ sources


def test_every_source_gives_the_in_memory_projector(tmp_path):
    h, w, b, _ = make_problem(n=900, d=24, num_classes=3, seed=2)
    h = (h - h.mean(0)).to(torch.float16)
    y = (h.double() @ w.T + b).argmax(1)
    want = LELPProjector(3).fit(h, y, head_weight=w, head_bias=b)

    np.save(tmp_path / "e.npy", h.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    from safetensors.torch import save_file
    save_file({"embeddings": h, "labels": y}, str(tmp_path / "e.safetensors"))
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"embeddings": pa.array(list(h.float().numpy())), "labels": pa.array(y.numpy())})
    pq.write_table(table, str(tmp_path / "e.parquet"), row_group_size=200)

    chunks = [(h[i:i + 128], y[i:i + 128]) for i in range(0, 900, 128)]
    sources = {
        "npy path": (str(tmp_path / "e.npy"), str(tmp_path / "y.npy")),
        "npy source": (NpySource(str(tmp_path / "e.npy"), str(tmp_path / "y.npy")), None),
        "safetensors": (str(tmp_path / "e.safetensors"), None),
        "parquet": (ParquetSource(str(tmp_path / "e.parquet")), None),
        "list of chunks": (chunks, None),
        "generator": ((c for c in chunks), None),
        "numpy": (h.numpy(), y.numpy()),
    }
    for name, (src, labels) in sources.items():
        got = LELPProjector(3).fit(src, labels, head_weight=w, head_bias=b, chunk_bytes=5000)
        torch.testing.assert_close(got.A, want.A, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(got.e, want.e, rtol=1e-4, atol=1e-4, msg=name)


def test_bf16_sources(tmp_path):
    h, w, b, y = make_problem(n=500, d=16, num_classes=2, seed=3)
    hb = (h - h.mean(0)).to(torch.bfloat16)
    want = LELPProjector(2).fit(hb.double(), y, head_weight=w, head_bias=b)
    np.save(tmp_path / "bits.npy", hb.view(torch.int16).numpy().view(np.uint16))
    got_npy = LELPProjector(2).fit(NpySource(str(tmp_path / "bits.npy"), y.numpy(), bf16=True),
                                   head_weight=w, head_bias=b)
    from safetensors.torch import save_file
    save_file({"embeddings": hb, "labels": y}, str(tmp_path / "b.safetensors"))
    got_st = LELPProjector(2).fit(SafetensorsSource(str(tmp_path / "b.safetensors")), head_weight=w, head_bias=b)
    for got in (got_npy, got_st):
        torch.testing.assert_close(got.A, want.A, rtol=1e-4, atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    h, w, b, y = make_problem(n=1000, d=20, num_classes=2, seed=4)
    h = h.float()
    sizes = [80, 20 * 4 * 33, 1 << 30]
    fits = [LELPProjector(3).fit(h, y, head_weight=w, head_bias=b, chunk_bytes=s) for s in sizes]
    for f in fits[1:]:
        torch.testing.assert_close(f.A, fits[0].A, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ accuracy


def test_exact_streaming_matches_fp64_reference_on_a_shifted_corpus():
    h, y = decaying_problem(n=3000, d=48, num_classes=2, seed=5)
    a_ref, e_ref = reference.fit_reference(h, y, 2, 4)
    got = LELPProjector(4, method="exact").fit(h.float(), y, chunk_bytes=48 * 4 * 257)
    torch.testing.assert_close(got.A.double(), a_ref, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("d, k", [(1, 1), (7, 3), (130, 8)])
def test_top_eigenpairs_subset_solver_matches_the_reference(d, k):
    g = torch.Generator().manual_seed(d)
    a = torch.randn(d, d + 5, generator=g, dtype=torch.float64)
    cov = a @ a.T
    evals, evecs = top_eigenpairs_of(cov, k)
    want_evals, want_evecs = reference.top_eigenvectors(cov, k)
    torch.testing.assert_close(evals, want_evals, rtol=1e-12, atol=0)
    torch.testing.assert_close(evecs, want_evecs, rtol=0, atol=1e-9)  # same signs, same order


@pytest.mark.parametrize("with_head", [False, True])
def test_nystrom_default_captures_995_of_exact_variance(with_head):
    h, y = decaying_problem(n=6000, d=96, num_classes=2, seed=6, power=1.0)
    w = torch.randn(2, 96, dtype=torch.float64) if with_head else None
    s = 8
    p = LELPProjector(s, method="nystrom", rotate=False).fit(h.float(), y, head_weight=w, chunk_bytes=96 * 4 * 1000)
    hp = h @ reference.null_space_projector(w) if with_head else h
    _, _, covs = reference.class_moments(hp, y, 2)
    ratios = captured_ratio(fitted_directions(p), covs, s)
    assert min(ratios) >= 0.995, ratios
    one_pass = LELPProjector(s, method="nystrom", passes=1, rotate=False).fit(h.float(), y, head_weight=w)
    assert min(captured_ratio(fitted_directions(one_pass), covs, s)) < min(ratios) + 1e-9
    if with_head:  # the sketch stays inside the null space
        torch.testing.assert_close(w.float() @ p.A, torch.zeros(2, 2 * s), atol=1e-4, rtol=0)
    # The total variance (for captured_variance) matches the exact trace.
    torch.testing.assert_close(p.total_variance, torch.diagonal(covs, dim1=1, dim2=2).sum(-1), rtol=1e-4, atol=0)


def test_method_auto_cost_model():
    big = 1_600_000  # Sentiment140-sized
    assert choose_method("auto", 768, 2, n_rows=big) == "nystrom"  # the sketch's passes cost less
    assert choose_method("auto", 192, 2, n_rows=big) == "exact"  # the Gram is cheaper at small d
    assert choose_method("auto", 384, 2, n_rows=big) == "nystrom"  # sampled iterations: ~1.25 passes
    assert choose_method("auto", 384, 2, n_rows=big, iteration_sample=1.0) == "exact"  # 3 full passes
    assert choose_method("auto", 768, 2, n_rows=big, passes=8, iteration_sample=1.0) == "exact"
    assert choose_method("auto", 768, 2, n_rows=16_000) == "exact"  # few flops: exact regardless
    # issue 21 item 15: 262 k x 768 is no longer "few flops"; the sketch was 2.3-2.9x faster there
    assert choose_method("auto", 768, 2, n_rows=262_144) == "nystrom"
    assert choose_method("auto", 768, 2, n_rows=20_000) == "nystrom"
    assert choose_method("auto", 768, 2, n_rows=big, rereadable=False) == "exact"  # one pass only
    assert choose_method("auto", 768, 2, n_rows=None) == "exact"  # unknown size
    assert choose_method("auto", 1024, 300, n_rows=100) == "nystrom"  # 300 x 1024² x 8 B > 2 GiB
    assert choose_method("exact", 4096, 2, n_rows=big) == "exact"


def test_method_auto_on_a_gpu_is_exact_while_the_state_fits():
    cuda = torch.device("cuda")  # only a description here: nothing runs on it
    assert choose_method("auto", 768, 2, n_rows=1_600_000, device=cuda) == "exact"
    assert choose_method("auto", 1024, 300, n_rows=100, device=cuda) == "nystrom"


@pytest.mark.parametrize("method", ["exact", "nystrom"])
def test_torch_statistics_path_matches_the_compiled_one(method):
    """backend="torch" runs the statistics as a GPU fit does (torch ops on the chunk's device)."""
    h, y = decaying_problem(n=3000, d=48, num_classes=2, seed=13)
    fits = {b: LELPProjector(4, method=method, rotate=False).fit(h.float(), y, chunk_bytes=48 * 4 * 500, backend=b)
            for b in ("torch", "cpu")}
    torch.testing.assert_close(fits["torch"].A, fits["cpu"].A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fits["torch"].eigenvalues, fits["cpu"].eigenvalues, rtol=1e-5, atol=0)


def test_fp64_torch_gram_matches_the_reference():
    """The fp64 Gram a GPU fit uses, run on the CPU."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(301, 24, generator=g)
    stats = ExactClassStatistics(2, 24, torch.zeros(2, 24, dtype=torch.float64), backend="torch")
    stats.compute_dtype = torch.float64
    stats.update(x, torch.tensor([100, 201]), torch.zeros(2, 24, dtype=torch.float64))
    for c, rows in enumerate((x[:100], x[100:])):
        want = rows.double().T @ rows.double()
        torch.testing.assert_close(torch.tril(stats.gram[c]), torch.tril(want), rtol=1e-12, atol=1e-12)


def test_cuda_device_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    h, y = decaying_problem(n=200, d=8, num_classes=2, seed=1)
    with pytest.raises(ValueError, match=r"device is 'cuda', but torch.cuda.is_available\(\) is False"):
        LELPProjector(2).fit(h.float(), y, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["exact", "nystrom"])
def test_gpu_fit_matches_the_cpu_fit(method):
    h, y = decaying_problem(n=5000, d=64, num_classes=3, seed=15)
    kwargs = dict(chunk_bytes=64 * 2 * 700)
    cpu = LELPProjector(4, method=method, rotate=False).fit(h.half(), y, **kwargs)
    gpu = LELPProjector(4, method=method, rotate=False).fit(h.half(), y, device="cuda", **kwargs)
    torch.testing.assert_close(gpu.A, cpu.A, rtol=1e-4, atol=1e-5)
    assert gpu.fit_info["rows"] == 5000


def test_iteration_stride_and_chunk_selection():
    assert iteration_stride(0.125, 1_600_000) == 8
    assert iteration_stride(0.125, 500_000) == 5  # at least ITERATION_MIN_ROWS rows are read
    assert iteration_stride(0.125, 150_000) == 1 and iteration_stride(1.0, 10**9) == 1
    assert iteration_stride(0.3, None) == 1
    with pytest.raises(ValueError, match="iteration_sample"):
        iteration_stride(0.0, 10)
    # Every sampled chunk is read by exactly one rank, and the sample does not depend on the world.
    for every in (1, 3, 8):
        for world in (1, 2, 3):
            readers = [[i for i in range(50) if wanted(i, 0, r, world, every)] for r in range(world)]
            flat = sorted(i for rank_chunks in readers for i in rank_chunks)
            assert flat == list(range(0, 50, every))
            assert max(map(len, readers)) - min(map(len, readers)) <= 1  # balanced


class _CountingSource(ArraySource):
    def __init__(self, *args):
        super().__init__(*args)
        self.read = []

    def chunks(self, *args, **kwargs):
        for chunk in super().chunks(*args, **kwargs):
            self.read.append(chunk.index)
            yield chunk


def test_sampled_iterations_read_fewer_chunks_and_keep_995_of_the_variance(monkeypatch):
    import lelp_fast.fit.engine as engine

    monkeypatch.setattr(engine, "ITERATION_MIN_ROWS", 1000)  # a small corpus stands in for a large one
    h, y = decaying_problem(n=8000, d=64, num_classes=2, seed=12, power=1.0)
    _, _, covs = reference.class_moments(h, y, 2)
    chunk = 64 * 4 * 250  # 32 chunks; stride min(8, 8000 // 1000) = 8
    results = {}
    for sample in (0.125, 1.0):
        source = _CountingSource(h.float(), y)
        p = LELPProjector(8, method="nystrom", rotate=False, iteration_sample=sample).fit(source, chunk_bytes=chunk)
        results[sample] = (source.read, min(captured_ratio(fitted_directions(p), covs, 8)))
    read, ratio = results[0.125]
    # Before them, the shift's first chunk (and what the prefetch thread had read ahead).
    # (prefetch depth 2: the first stream reads at most 4 chunks ahead)
    assert read[-40:] == [0, 8, 16, 24] * 2 + list(range(32)) and len(read) <= 40 + 4
    assert results[1.0][0] == list(range(32)) * 3
    assert ratio >= 0.995 and ratio >= results[1.0][1] - 2e-3, (ratio, results[1.0][1])


def test_auto_fits_a_large_corpus_with_the_sketch_and_keeps_995_of_the_variance(monkeypatch):
    import lelp_fast.fit.engine as engine

    monkeypatch.setattr(engine, "EXACT_FLOPS_ALWAYS", 0.0)  # a small corpus stands in for a large one
    h, y = decaying_problem(n=6000, d=600, num_classes=2, seed=6, power=1.0)
    p = LELPProjector(8, rotate=False).fit(h.float(), y)
    assert p.fitted_method == "nystrom"
    _, _, covs = reference.class_moments(h, y, 2)
    assert min(captured_ratio(fitted_directions(p), covs, 8)) >= 0.995


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("method", ["exact", "nystrom", "nystrom-sampled"])
def test_resume_after_interrupt_gives_identical_bytes(tmp_path, method, monkeypatch):
    from lelp_fast.fit import engine

    h, w, b, y = make_problem(n=1200, d=20, num_classes=2, seed=7)
    h = h.float()
    kwargs = dict(head_weight=w, head_bias=b, chunk_bytes=20 * 4 * 100)  # 12 chunks per pass
    stops = {"exact": (5,), "nystrom": (5, 17), "nystrom-sampled": (2, 5)}[method]  # in pass 1 (2: its end) / pass 2
    if method == "nystrom-sampled":  # pass 1 reads chunks 0 and 8, pass 2 all 12
        monkeypatch.setattr(engine, "ITERATION_MIN_ROWS", 100)
    make = lambda: LELPProjector(3, method=method.split("-")[0], passes=2)  # noqa: E731
    clean = make().fit(h, y, **kwargs)
    ckpt = str(tmp_path / "fit.ckpt")

    for stop in stops:
        if os.path.exists(ckpt):
            os.unlink(ckpt)
        original = engine.accumulate

        def interrupted(*args, **kw):
            return original(*args, stop_after_chunks=stop, **kw)

        engine.accumulate = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                make().fit(h, y, checkpoint=ckpt, checkpoint_every=2, **kwargs)
        finally:
            engine.accumulate = original
        assert os.path.exists(ckpt)
        with pytest.raises(ValueError, match="pass resume=True"):
            make().fit(h, y, checkpoint=ckpt, **kwargs)
        resumed = make().fit(h, y, checkpoint=ckpt, checkpoint_every=2, resume=True, **kwargs)
        assert torch.equal(resumed.A, clean.A) and torch.equal(resumed.e, clean.e)
        assert not os.path.exists(ckpt)  # removed once the fit is done


def test_stale_checkpoint_is_refused(tmp_path):
    h, w, b, y = make_problem(n=600, d=12, num_classes=2, seed=8)
    ckpt = str(tmp_path / "c.ckpt")
    from lelp_fast.fit import engine

    original = engine.accumulate
    engine.accumulate = lambda *a, **k: original(*a, stop_after_chunks=2, **k)
    try:
        with pytest.raises(KeyboardInterrupt):
            LELPProjector(2).fit(h.float(), y, head_weight=w, checkpoint=ckpt, checkpoint_every=1, chunk_bytes=480)
    finally:
        engine.accumulate = original
    with pytest.raises(ValueError, match="written for other data or settings"):
        LELPProjector(3).fit(h.float(), y, head_weight=w, checkpoint=ckpt, resume=True, chunk_bytes=480)
    with open(ckpt, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        LELPProjector(2).fit(h.float(), y, head_weight=w, checkpoint=ckpt, resume=True, chunk_bytes=480)


def test_a_flipped_bit_in_a_checkpoints_position_is_an_error(tmp_path):
    """A fit checkpoint's sha256 covered its tensors, not its metadata: a flipped bit turning
    next_chunk 2 into 3 resumed past a chunk, and the fit silently left its rows out."""
    h, w, b, y = make_problem(n=600, d=12, num_classes=2, seed=8)
    ckpt = tmp_path / "c.ckpt"
    from lelp_fast.fit import engine

    original = engine.accumulate
    engine.accumulate = lambda *a, **k: original(*a, stop_after_chunks=2, **k)
    try:
        with pytest.raises(KeyboardInterrupt):
            LELPProjector(2).fit(h.float(), y, head_weight=w, checkpoint=str(ckpt), checkpoint_every=1,
                                 chunk_bytes=480)
    finally:
        engine.accumulate = original
    data = ckpt.read_bytes()
    at = data.index(b'next_chunk\\": 2') + len(b'next_chunk\\": ')
    flipped = bytearray(data)
    flipped[at] ^= 0x01  # "2" -> "3"
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"c.ckpt: its metadata fails its sha256 checksum.*delete it to start over"):
        LELPProjector(2).fit(h.float(), y, head_weight=w, checkpoint=str(ckpt), resume=True, chunk_bytes=480)


# ------------------------------------------------------------------ bad input


def test_nan_rows_raise_with_global_row_or_are_skipped():
    h, w, b, y = make_problem(n=500, d=12, num_classes=2, seed=9)
    h = h.float()
    h[333, 2] = float("nan")
    h[401, 0] = float("inf")
    with pytest.raises(ValueError, match="embeddings row 333 contains NaN or Inf"):
        LELPProjector(2).fit(h, y, head_weight=w, chunk_bytes=12 * 4 * 50)
    p = LELPProjector(2).fit(h, y, head_weight=w, chunk_bytes=12 * 4 * 50, nan_policy="skip")
    assert p.fit_info["rows_skipped"] == 2 and p.fit_info["rows"] == 498
    three_passes = LELPProjector(2, method="nystrom").fit(h, y, head_weight=w, chunk_bytes=12 * 4 * 50,
                                                          nan_policy="skip")
    assert three_passes.fit_info["rows_skipped"] == 2  # counted once, not once per pass
    keep = torch.ones(500, dtype=torch.bool)
    keep[[333, 401]] = False
    clean = LELPProjector(2).fit(h[keep], y[keep], head_weight=w)
    torch.testing.assert_close(p.A, clean.A, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="nan_policy"):
        LELPProjector(2).fit(h, y, head_weight=w, nan_policy="ignore")


def test_skipped_rows_are_counted_once_after_a_resume_at_a_pass_boundary(tmp_path, monkeypatch):
    from lelp_fast.fit import engine

    h, w, b, y = make_problem(n=600, d=12, num_classes=2, seed=9)
    h = h.float()
    h[333, 2] = float("nan")
    kwargs = dict(head_weight=w, chunk_bytes=12 * 4 * 50, nan_policy="skip", checkpoint=str(tmp_path / "c.ckpt"))
    make = lambda: LELPProjector(2, method="nystrom", passes=2)  # noqa: E731
    original = engine.accumulate
    # 12 chunks per pass: killed after the first chunk of pass 2, before any checkpoint of that
    # pass, so the resume starts from the one written at the pass boundary.
    monkeypatch.setattr(engine, "accumulate", lambda *a, **k: original(*a, stop_after_chunks=13, **k))
    with pytest.raises(KeyboardInterrupt):
        make().fit(h, y, checkpoint_every=100, **kwargs)
    monkeypatch.setattr(engine, "accumulate", original)
    resumed = make().fit(h, y, resume=True, **kwargs)
    assert resumed.fit_info["rows_skipped"] == 1 and resumed.fit_info["rows"] == 599


def test_label_out_of_range_names_the_global_row():
    h, w, b, y = make_problem(n=500, d=12, num_classes=2, seed=10)
    y[321] = 7
    with pytest.raises(ValueError, match=r"out of range.*global row 321"):
        LELPProjector(2).fit(h.float(), y, head_weight=w, chunk_bytes=12 * 4 * 100)


def test_truncated_npy_is_refused(tmp_path):
    h, _, _, y = make_problem(n=300, d=10, num_classes=2, seed=11)
    path = tmp_path / "e.npy"
    np.save(path, h.float().numpy())
    data = path.read_bytes()
    path.write_bytes(data[:-400])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        LELPProjector(2).fit(str(path), y.numpy())


def test_npy_truncated_after_opening_is_refused_not_a_crash(tmp_path):
    h, _, _, y = make_problem(n=300, d=10, num_classes=2, seed=11)
    path = tmp_path / "e.npy"
    np.save(path, h.float().numpy())
    source = NpySource(str(path), y.numpy())
    chunks = source.chunks(10 * 4 * 100)
    first = next(chunks)  # mapped before the file shrinks: still readable
    os.truncate(path, os.path.getsize(path) - 400)
    with pytest.raises(ValueError, match="ended early at row 290"):
        list(chunks)
    np.testing.assert_array_equal(first.embeddings.numpy(), h.float().numpy()[:100])


def test_npy_chunks_are_writable_private_copies(tmp_path):
    path = tmp_path / "e.npy"
    data = np.arange(60, dtype=np.float16).reshape(6, 10)
    np.save(path, data)
    chunk = next(NpySource(str(path), np.zeros(6, dtype=np.int64)).chunks(10 * 2 * 4, skip=1))
    assert chunk.start_row == 4
    chunk.embeddings[0, 0] = -1.0  # copy-on-write: the file is not changed
    np.testing.assert_array_equal(np.load(path), data)


def test_one_shot_iterator_cannot_do_several_passes():
    h, _, _, y = make_problem(n=300, d=10, num_classes=2, seed=12)
    gen = ((h[i:i + 100].float(), y[i:i + 100]) for i in range(0, 300, 100))
    with pytest.raises(ValueError, match="one-shot iterator"):
        LELPProjector(2, method="nystrom", passes=2).fit(gen, num_classes=2)
    assert not IterableSource(gen).rereadable


def test_missing_num_classes_for_plain_iterables():
    h, _, _, y = make_problem(n=300, d=10, num_classes=2, seed=13)
    with pytest.raises(ValueError, match=r"num_classes \(lelp-fast fit --num-classes\) is required"):
        LELPProjector(2).fit([(h.float(), y)])


def test_prefetch_keeps_order_and_reraises():
    from lelp_fast.io.prefetch import prefetch

    assert list(prefetch(range(50), depth=3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise RuntimeError("source broke")

    got = []
    with pytest.raises(RuntimeError, match="source broke"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1, 2]
    stream = prefetch(iter(range(10**9)), depth=2)  # an early stop ends the producer thread
    assert next(stream) == 0
    stream.close()


def test_checkpoint_with_a_flipped_bit_is_refused_and_stale_temps_are_removed(tmp_path):
    """A flipped bit in the checkpointed Gram was resumed from (result off by 5e-4); temp files of a
    run killed mid-write were never removed."""
    from test_projector import _flip_bit_in_tensor

    from lelp_fast.fit import engine

    h, w, b, y = make_problem(n=600, d=12, num_classes=2, seed=9)
    ckpt = str(tmp_path / "c.ckpt")
    stale = tmp_path / ".tmp-c.ckpt-killed"
    stale.write_bytes(b"x" * 1000)
    original = engine.accumulate
    engine.accumulate = lambda *a, **k: original(*a, stop_after_chunks=2, **k)
    try:
        with pytest.raises(KeyboardInterrupt):
            LELPProjector(2, method="exact").fit(h.float(), y, head_weight=w, checkpoint=ckpt, checkpoint_every=1,
                                                 chunk_bytes=480)
    finally:
        engine.accumulate = original
    assert not stale.exists()
    import json
    import struct

    header = json.loads(open(ckpt, "rb").read()[8:8 + struct.unpack("<Q", open(ckpt, "rb").read(8))[0]])
    gram = next(name for name in header if name.startswith("state.") and "gram" in name.lower()
                or name.startswith("state.") and header[name]["shape"][-1] == 12 and len(header[name]["shape"]) == 3)
    _flip_bit_in_tensor(ckpt, gram)
    with pytest.raises(ValueError, match="sha256"):
        LELPProjector(2, method="exact").fit(h.float(), y, head_weight=w, checkpoint=ckpt, resume=True,
                                             chunk_bytes=480)


def _parquet(tmp_path, rows, labels):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"embeddings": pa.array(rows, type=pa.list_(pa.float32())), "labels": labels}), path)
    return path


def test_parquet_rows_of_the_wrong_length_are_refused(tmp_path):
    """Rows of 15 and 17 values with d = 16 were re-cut silently into 16-wide rows."""
    from lelp_fast.io import ParquetSource

    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(16).tolist() for _ in range(40)]
    rows[7], rows[8] = rows[7][:15], rows[8] + [0.5]
    path = _parquet(tmp_path, rows, list(range(2)) * 20)
    with pytest.raises(ValueError, match=r"bad.parquet: column 'embeddings' row 7 has 15 values, expected 16"):
        LELPProjector(2).fit(ParquetSource(path))


def test_parquet_float_labels_follow_the_one_label_rule(tmp_path):
    """Float labels (y + 0.6) were truncated silently from Parquet while .npy refused them."""
    from lelp_fast.io import ParquetSource

    rng = np.random.default_rng(1)
    rows = [rng.standard_normal(8).tolist() for _ in range(40)]
    path = _parquet(tmp_path, rows, [y + 0.6 for y in [0, 1] * 20])
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        LELPProjector(2).fit(ParquetSource(path))
    path = _parquet(tmp_path, rows, [None] + [0, 1] * 19 + [1])
    with pytest.raises(ValueError, match="column 'labels' row 0 is null"):
        LELPProjector(2).fit(ParquetSource(path))


def test_fit_on_bf16_tensors():
    """The source fingerprint called np.asarray on a bf16 tensor: TypeError on every bf16 fit."""
    h, _, _, y = make_problem(n=300, d=12, num_classes=2, seed=41)
    p = LELPProjector(2).fit(h.to(torch.bfloat16), y)
    q = LELPProjector(2).fit(h.to(torch.bfloat16).float(), y)
    torch.testing.assert_close(p.A, q.A)


def test_parquet_chunks_are_writable_copies_without_a_warning(tmp_path):
    """Arrow's buffers reach numpy read-only: torch shared them (a write would fault) and warned with a
    UserWarning on the first read of every session, until session 58."""
    import warnings

    from lelp_fast.io import ParquetSource

    rng = np.random.default_rng(2)
    rows = [rng.standard_normal(8).astype(np.float32).tolist() for _ in range(40)]
    path = _parquet(tmp_path, rows, [0, 1] * 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunks = list(ParquetSource(path).chunks())
    for chunk in chunks:
        for t in (chunk.embeddings, chunk.labels):
            assert t.numpy().flags.writeable
        chunk.embeddings += 1
    assert torch.equal(torch.cat([c.embeddings for c in chunks]), torch.tensor(rows) + 1)
    assert torch.equal(torch.cat([c.embeddings for c in ParquetSource(path).chunks()]), torch.tensor(rows))


def test_a_killed_writers_temp_directory_is_removed_too(tmp_path):
    """write_through_temp writes in a temp directory beside the file (the name torch's archives
    record): a writer killed there leaves the directory, which the next writer's cleanup removes."""
    from lelp_fast.io.integrity import remove_stale_temps, temp_prefix

    path = tmp_path / "c.ckpt"
    stale = tmp_path / (temp_prefix(str(path)) + "killed")
    stale.mkdir()
    (stale / "c.ckpt").write_bytes(b"x" * 1000)
    (tmp_path / (temp_prefix(str(path)) + "old")).write_bytes(b"y")  # a file, as written before
    assert remove_stale_temps(str(path)) == 2
    assert list(tmp_path.iterdir()) == []
