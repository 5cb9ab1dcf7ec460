"""The streaming fit: read a source chunk by chunk, accumulate per-class statistics, resume, sum ranks.

Data flow per chunk: validate (NaN/Inf, labels, dims) → labels (given, or the teacher's argmax)
→ :func:`bucket_rows` (class order, fp32, minus the class shift; C++ on CPU) → the statistics
(BLAS ``ssyrk`` for the exact Gram; a fused C++ update for the sketch, or torch GEMMs). After
the last chunk of a pass the additive state is summed over ranks with
``torch.distributed.all_reduce``. Progress is checkpointed atomically every ``checkpoint_every``
chunks; a resumed fit skips the chunks already counted and ends with the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .._checks import require_device
from .._dist import default_group, rank_world
from ..io.device_copy import stage_ahead
from ..io.integrity import (check_metadata_checksum, remove_stale_temps, tensors_sha256, with_metadata_checksum,
                            write_through_temp)
from ..io.locks import ExclusiveLock
from ..io.prefetch import prefetch
from ..io.sources import DEFAULT_CHUNK_BYTES, Chunk, EmbeddingSource
from .bucket import LabelOutOfRange, bucket_rows
from .exact import ExactClassStatistics
from .sketch import SketchClassStatistics

METHODS = ("auto", "exact", "nystrom")
NAN_POLICIES = ("raise", "skip")
# Largest per-class d x d fp64 state the exact method may hold in total.
EXACT_STATE_BUDGET_BYTES = 2 << 30
# Below this many Gram flops (n d², e.g. 16 k rows x 768) the exact fit is chosen whatever the
# sketch would cost: a few seconds either way, and it is exact. It was 2e11, which sent 262 k x 768
# (1.5e11) to the exact fit although the sketch was 2.3-2.9x faster there (issue 21 item 15). Measured
# here (benchmarks/bench_fit_method.py, d = 768, C = 2, S = 8, loaded machine; docs/benchmarks.md):
# exact / sketch time 2.6-3.7 for N = 16 k .. 262 k and 5-8 at N = 1-2 k (the exact fit's d x d eigh
# per class dominates there), the sketch capturing >= 0.9989 of the exact top-S variance every time.
EXACT_FLOPS_ALWAYS = 1e10
# Time of one sketch flop in units of one exact-Gram flop: the fused sketch update runs at about
# 90 GFLOP/s against ssyrk's 110-135, and every extra pass buckets the rows again, which costs
# about as much as the update itself (docs/benchmarks.md, "fit"). Measured on the project machine.
SKETCH_FLOP_COST = 2.5
# Fewest rows the subspace iterations of a multi-pass sketch read when they take a sample.
ITERATION_MIN_ROWS = 100_000
# Bumped when the checkpointed statistics change meaning (2: the exact Gram is its lower triangle),
# so that an older checkpoint is refused rather than misread.
STATE_FORMAT = 2


def choose_method(method: str, dim: int, num_classes: int, *, n_rows: Optional[int] = None,
                  rereadable: bool = True, sketch_size: int = 18, passes: int = 3,
                  iteration_sample: float = 0.125, device: torch.device = torch.device("cpu")) -> str:
    """``auto``: a cost model over the Gram's n d² flops and the sketch's 4 n d k per pass.

    The sketch's passes before the last read a sample (see :func:`iteration_stride`), so they
    count as that share of a pass. Exact when the source can be read only once (and its d x d
    states fit), when its flops are few, or when they cost less than the sketch; the Nyström
    sketch otherwise. With k = 18, 3 passes and the default sample the sketch wins above
    d ≈ 225 for large n. The constants were measured on the CPU. On a GPU the exact fit is
    chosen whenever its state fits: its fp64 Gram runs on the GPU's GEMM units (not measured
    yet: no GPU was lent to this work).
    """
    if method != "auto":
        return method
    if num_classes * dim * dim * 8 > EXACT_STATE_BUDGET_BYTES:
        return "nystrom"
    if torch.device(device).type != "cpu" or not rereadable or n_rows is None:
        return "exact"  # one pass, exact; the sketch would need several passes for its accuracy
    reads = 1.0 + (max(1, passes) - 1) / iteration_stride(iteration_sample, n_rows)
    exact_flops = float(n_rows) * dim * dim
    sketch_flops = SKETCH_FLOP_COST * reads * 4.0 * n_rows * dim * sketch_size
    if exact_flops <= EXACT_FLOPS_ALWAYS or exact_flops <= sketch_flops:
        return "exact"
    return "nystrom"


def iteration_stride(iteration_sample: float, n_rows: Optional[int]) -> int:
    """Every how many chunks the Nyström passes before the last read (1: all of them): about
    ``1 / iteration_sample``, but never fewer than ``ITERATION_MIN_ROWS`` rows."""
    if not 0.0 < iteration_sample <= 1.0:
        raise ValueError(f"iteration_sample must lie in (0, 1], got {iteration_sample!r}")
    if n_rows is None:
        return 1
    return max(1, min(round(1.0 / iteration_sample), n_rows // ITERATION_MIN_ROWS))


@dataclass
class FitSettings:
    num_classes: Optional[int]
    n_subclasses: int
    method: str = "auto"
    oversampling: int = 10
    passes: int = 3  # Nyström passes (1 = single pass); ignored by the exact method
    # Share of the chunks (every 1/x-th, at least ITERATION_MIN_ROWS rows) that the Nyström passes
    # before the last read: they only steer Ω; the last pass reads every chunk. 1.0: all chunks.
    iteration_sample: float = 0.125
    seed: int = 0
    assign: str = "label"
    nan_policy: str = "raise"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    backend: str = "auto"
    device: str = "cpu"  # where the statistics are accumulated ("cuda": chunks are copied there)
    prefetch: int = 2  # chunks read ahead in a background thread (0: none)


@dataclass
class FitResult:
    method: str
    means: torch.Tensor
    evals: torch.Tensor
    evecs: torch.Tensor
    total_variance: torch.Tensor
    counts: torch.Tensor
    rows_seen: int
    rows_skipped: int
    seconds: float
    bytes_read: int
    extra: dict = field(default_factory=dict)


class _Progress:
    """tqdm bar over rows with throughput in rows/s and GB/s."""

    def __init__(self, enabled: bool, total: Optional[int], desc: str, world: int = 1):
        from tqdm.auto import tqdm

        self.world = world
        self.bar = tqdm(total=total, desc=desc, unit="rows", unit_scale=True, disable=not enabled)
        self.t0 = time.perf_counter()
        self.bytes = 0

    def update(self, rows: int, nbytes: int) -> None:
        self.bytes += nbytes
        self.bar.update(rows * self.world)  # rank 0's rows stand for every rank's share
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.bytes / dt / 1e9:.2f} GB/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _all_reduce(tensors, process_group) -> None:
    if process_group is None:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)


def _broadcast(tensor: torch.Tensor, process_group) -> None:
    if process_group is None:
        return
    import torch.distributed as dist

    dist.broadcast(tensor, src=dist.get_global_rank(process_group, 0), group=process_group)


class _ChunkReader:
    """Turns raw chunks into (embeddings, labels) after every check, with global row numbers."""

    def __init__(self, settings: FitSettings, head_weight, head_bias):
        self.s = settings
        self.w, self.b = head_weight, head_bias
        self.dim: Optional[int] = None
        self.skipped = 0

    def __call__(self, chunk: Chunk):
        h, y, z = chunk.embeddings, chunk.labels, chunk.teacher_logits
        where = f"chunk {chunk.index}"
        if h.ndim != 2:
            raise ValueError(f"embeddings ({where}) must be 2-D, got shape {tuple(h.shape)}")
        if not h.dtype.is_floating_point:
            raise ValueError(f"embeddings must be float32/float16/bfloat16/float64, got {h.dtype}; cast with .float()")
        if self.dim is None:
            self.dim = h.shape[1]
        elif h.shape[1] != self.dim:
            raise ValueError(f"embeddings ({where}, row {chunk.start_row}) have d={h.shape[1]}, earlier chunks had d={self.dim}")
        if self.w is not None and h.shape[1] != self.w.shape[1]:
            raise ValueError(f"embeddings have d={h.shape[1]} but head_weight has d={self.w.shape[1]}")
        if y is None and self.s.assign == "label":
            raise ValueError('labels are required (--labels), or assign="teacher" (--assign teacher) to fit by the '
                             "teacher's classes")
        if self.s.num_classes is None:
            if z is None:
                raise ValueError(
                    "num_classes (lelp-fast fit --num-classes) is required when neither a head, teacher logits "
                    "nor in-memory labels give it"
                )
            self.s.num_classes = z.shape[1]
        c = self.s.num_classes
        if z is not None and (z.ndim != 2 or z.shape != (h.shape[0], c)):
            raise ValueError(f"teacher_logits ({where}) must have shape ({h.shape[0]}, {c}), got {tuple(z.shape)}")
        if z is not None:  # embeddings are checked for free inside the bucketing kernel
            bad_logits = ~torch.isfinite(z).all(dim=1)
            if bool(bad_logits.any()):
                h, y, z = self.drop_rows(chunk, bad_logits, h, y, z, "teacher_logits")
        if self.s.assign == "teacher":
            if z is None and self.w is not None:
                z = h.to(torch.float64) @ self.w.T + self.b
            if z is None:
                raise ValueError('assign="teacher" needs head_weight or teacher_logits to read predictions from')
            y = z.argmax(dim=1)
        if y.ndim != 1 or y.shape[0] != h.shape[0]:
            raise ValueError(f"labels ({where}) must be 1-D with one entry per row, got shape {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {y.dtype}")
        return h, y  # the label range is checked by the bucketing kernel (see accumulate)

    def drop_rows(self, chunk: Chunk, bad: torch.Tensor, h, y, z=None, what: str = "embeddings"):
        """NaN/Inf rows: raise naming the first (global row number), or drop and count them."""
        if self.s.nan_policy == "raise":
            first = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"{what} row {chunk.start_row + first} contains NaN or Inf; drop it, or pass "
                "nan_policy='skip' (--nan-policy skip) to skip and count such rows"
            )
        self.skipped += int(bad.sum())
        keep = ~bad
        return h[keep], None if y is None else y[keep], None if z is None else z[keep]


def _shift_from(h: torch.Tensor, y: torch.Tensor, num_classes: int, backend: str) -> torch.Tensor:
    """Per-class mean of this chunk's finite rows; the chunk mean for classes it lacks (any fixed
    value works: it only keeps the fp32 products small)."""
    zero = torch.zeros(num_classes, h.shape[1], dtype=torch.float64)
    try:
        buckets = bucket_rows(h, y, zero, num_classes, backend)
    except LabelOutOfRange:
        return zero  # the main loop reports the bad label with its global row
    if buckets.bad is not None:  # NaN rows: their policy is applied later; ignore them here
        keep = ~buckets.bad
        buckets = bucket_rows(h[keep], y[keep], zero, num_classes, backend)
    counts, sums = buckets.counts.cpu(), buckets.sums.cpu()
    total = int(counts.sum())
    if total == 0:
        return zero
    overall = sums.sum(0) / total
    present = counts > 0
    shift = overall.expand(num_classes, -1).clone()
    shift[present] = sums[present] / counts[present].unsqueeze(1).to(torch.float64)
    return shift


def _settings_key(settings: FitSettings, method: str, source: EmbeddingSource, rank: int, world: int, extra: str) -> str:
    blob = json.dumps(
        {"C": settings.num_classes, "S": settings.n_subclasses, "method": method, "over": settings.oversampling,
         "passes": settings.passes, "sample": settings.iteration_sample, "seed": settings.seed,
         "assign": settings.assign, "nan": settings.nan_policy,
         "chunk_bytes": settings.chunk_bytes, "source": source.fingerprint(), "rank": rank, "world": world,
         "extra": extra, "state_format": STATE_FORMAT},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StaleCheckpointError(ValueError):
    """A checkpoint written for other data or settings (``chunk_bytes`` among them)."""


def _save_checkpoint(path: str, stats, shift: torch.Tensor, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"state.{k}": v.detach().cpu().contiguous() for k, v in stats.state().items()}
    tensors["shift"] = shift.cpu().contiguous()
    meta = with_metadata_checksum({**meta, "tensors_sha256": tensors_sha256(tensors)})

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"meta": json.dumps(meta, sort_keys=True)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    write_through_temp(write, path)


def _load_checkpoint(path: str):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"checkpoint {path} is unreadable or corrupt ({exc}); delete it to start over") from exc
    meta = check_metadata_checksum(meta, f"checkpoint {path}", "delete it to start over")
    if meta.pop("tensors_sha256", None) != tensors_sha256(tensors):
        raise ValueError(f"checkpoint {path} fails its sha256 checksum (corrupt or written before checksums); "
                         "delete it to start over")
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    return meta, tensors["shift"], state


def accumulate(
    source: EmbeddingSource,
    settings: FitSettings,
    *,
    head_weight: Optional[torch.Tensor] = None,
    head_bias: Optional[torch.Tensor] = None,
    projector: Optional[torch.Tensor] = None,
    process_group=None,
    checkpoint: Optional[str] = None,
    checkpoint_every: int = 16,
    resume: bool = False,
    progress: bool = False,
    stop_after_chunks: Optional[int] = None,
) -> FitResult:
    """Streams ``source`` once (exact) or ``passes`` times (Nyström; all but the last pass over a
    strided sample of the chunks, see :func:`iteration_stride`) and returns the eigenpairs.

    ``stop_after_chunks`` (testing aid) raises KeyboardInterrupt after that many chunks, as if the
    run had been killed there.
    """
    if settings.nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {settings.nan_policy!r}")
    if settings.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {settings.method!r}")
    device = require_device("device", settings.device)
    process_group = default_group(process_group)  # torchrun's when none is given
    rank, world = rank_world(process_group)
    if checkpoint is not None and world > 1:
        checkpoint = f"{checkpoint}.rank{rank}"
    with contextlib.ExitStack() as held:  # one run at a time writes a checkpoint
        if checkpoint is not None:
            held.enter_context(ExclusiveLock(f"{checkpoint}.lock", f"checkpoint {checkpoint}"))
        return _accumulate(source, settings, head_weight, head_bias, projector, process_group, checkpoint,
                           checkpoint_every, resume, progress, stop_after_chunks, device, rank, world)


def _accumulate(source, settings, head_weight, head_bias, projector, process_group, checkpoint, checkpoint_every,
                resume, progress, stop_after_chunks, device, rank, world) -> FitResult:
    """The body of :func:`accumulate`, run while the checkpoint is locked."""
    reader = _ChunkReader(settings, head_weight, head_bias)
    t0 = time.perf_counter()
    workspace = torch.empty(0)
    bar = _Progress(progress and rank == 0, source.n_rows, "fit", world)

    def chunk_stream(skip: int, every: int = 1):
        chunks = source.chunks(settings.chunk_bytes, skip=skip, rank=rank, world=world, every=every)
        read = ((chunk, reader(chunk)) for chunk in prefetch(chunks, settings.prefetch))
        if device.type != "cpu":  # reusable pinned buffers; chunk i + 1's copy overlaps chunk i's statistics
            read = stage_ahead(read, device)
        for chunk, (h, y) in read:
            yield chunk, h, y

    # The shift comes from this rank's first chunk, then rank 0's is broadcast to all.
    stream = chunk_stream(0)
    first = next(stream, None)
    if first is None and world == 1:
        raise ValueError("embeddings is empty: no rows to fit on")
    dim = reader.dim if reader.dim is not None else source.dim
    c = settings.num_classes
    # Each class needs S directions of its own; C·S may exceed d (classes share directions).
    projected = head_weight is not None and projector is not None
    null_dim = dim - (int(torch.linalg.matrix_rank(head_weight)) if projected else 0)
    if settings.n_subclasses > null_dim:
        left = (f"d - rank(W) = {null_dim}, the dimension left after the null-space projection" if projected
                else f"the embeddings' dimension d = {dim}")
        raise ValueError(f"n_subclasses={settings.n_subclasses} exceeds {left}; lower n_subclasses")
    shift = _shift_from(first[1], first[2], c, settings.backend) if first is not None else torch.zeros(c, dim, dtype=torch.float64)
    if process_group is not None:  # on the fit's device: NCCL groups take only GPU tensors
        shift_on_device = shift.to(device)
        _broadcast(shift_on_device, process_group)
        shift = shift_on_device.cpu()

    stats, method, n_passes, stride = _new_statistics(settings, source, head_weight, projector, dim, null_dim,
                                                      shift, device)
    if source.n_rows is not None and n_passes > 1:  # the sketch's passes: a strided sample, then every row
        bar.bar.total = int(source.n_rows * (1 + (n_passes - 1) / stride))
    key = None if checkpoint is None else _settings_key(  # the source's fingerprint may read every byte
        settings, method, source, rank, world, f"{head_weight is not None}:{projector is not None}:{device.type}")

    start_pass, skip = _restore(checkpoint, resume, key, shift, stats, reader, source)
    if checkpoint is not None and world > 1:
        _check_ranks_agree(start_pass, checkpoint, process_group)

    chunks_done = 0
    for p in range(start_pass, n_passes):
        if p > start_pass:
            skip = 0
        if p > 0 and skip == 0:  # (also when resumed at a pass boundary)
            reader.skipped = 0  # every pass meets the same bad rows: count the last pass's
        every = stride if p + 1 < n_passes else 1  # the subspace iterations read a strided sample
        if (p, skip, every) == (0, 0, 1) and first is not None:
            stream = _prepend(first, stream)
        else:
            stream.close()  # (a no-op once exhausted)
            stream = chunk_stream(skip, every)
        first = None
        last_index = skip - 1
        for chunk, h, y in stream:
            n, d = h.shape
            if device.type == "cpu" and workspace.numel() < n * d:
                workspace = torch.empty(n * d)
            try:
                buckets = bucket_rows(h, y, shift, c, settings.backend, workspace)
            except LabelOutOfRange as exc:
                raise ValueError(f"{exc} (global row {chunk.start_row + exc.row})") from None
            if buckets.bad is not None:  # rare: drop the rows (or raise) and bucket again
                h, y, _ = reader.drop_rows(chunk, buckets.bad, h, y)
                buckets = bucket_rows(h, y, shift, c, settings.backend, workspace)
            stats.update(buckets.x, buckets.counts, buckets.sums)
            last_index = chunk.index
            bar.update(n, chunk.embeddings.numel() * chunk.embeddings.element_size())
            chunks_done += 1
            if checkpoint is not None and chunks_done % checkpoint_every == 0:
                meta = {"key": key, "pass": p, "next_chunk": last_index + 1, "skipped": reader.skipped}
                _save_checkpoint(checkpoint, stats, shift, meta)
            if stop_after_chunks is not None and chunks_done >= stop_after_chunks:
                bar.close()
                raise KeyboardInterrupt(f"stopped after {chunks_done} chunks (stop_after_chunks)")
        _all_reduce(list(stats.additive().values()), process_group)
        if p + 1 < n_passes:
            stats.next_pass()
            if checkpoint is not None:
                _save_checkpoint(checkpoint, stats, shift, {"key": key, "pass": p + 1, "next_chunk": 0,
                                                            "skipped": reader.skipped})
    bar.close()
    skipped = torch.tensor([reader.skipped], dtype=torch.int64, device=device)
    _all_reduce([skipped], process_group)
    stats.to(torch.device("cpu"))
    _check_counts(stats.count, int(skipped), settings.n_subclasses)
    _check_statistics_finite(stats.additive(), source)
    means, evals, evecs, total = stats.top_eigenpairs(settings.n_subclasses, projector)
    _check_class_ranks(evals, total, settings.n_subclasses)
    if checkpoint is not None and os.path.exists(checkpoint):
        os.unlink(checkpoint)
    nbytes = bar.bytes
    return FitResult(method, means, evals, evecs, total, stats.count.clone(), int(stats.count.sum()),
                     int(skipped), time.perf_counter() - t0, nbytes)


def _new_statistics(settings, source, head_weight, projector, dim, null_dim, shift, device):
    """The fit's statistics for the method ``auto`` chooses: (stats, method, passes, chunk stride)."""
    c = settings.num_classes
    k = min(settings.n_subclasses + settings.oversampling, null_dim)
    method = choose_method(settings.method, dim, c, n_rows=source.n_rows, rereadable=source.rereadable,
                           sketch_size=k, passes=settings.passes, iteration_sample=settings.iteration_sample,
                           device=device)
    if method == "exact":
        return ExactClassStatistics(c, dim, shift, settings.backend, device), method, 1, 1
    basis = None
    if projector is not None and head_weight is not None:
        basis = torch.linalg.qr(head_weight.T.to(torch.float64))[0]
    stats = SketchClassStatistics(c, dim, shift, k, settings.seed, projector, basis, settings.backend, device)
    n_passes = max(1, settings.passes)
    stride = iteration_stride(settings.iteration_sample, source.n_rows) if n_passes > 1 else 1
    if n_passes > 1 and not source.rereadable:
        raise ValueError(
            f"method='nystrom' with passes={n_passes} reads the data {n_passes} times, but this source "
            "is a one-shot iterator; pass a list or a file, or use passes=1"
        )
    return stats, method, n_passes, stride


def _restore(checkpoint, resume, key, shift, stats, reader, source):
    """Loads a checkpoint into ``shift``/``stats``/``reader``; returns where to go on (pass, next chunk)."""
    if checkpoint is None:
        return 0, 0
    remove_stale_temps(checkpoint)  # a run killed mid-write leaves a full C·d²·8-byte temp file
    if not os.path.exists(checkpoint):
        return 0, 0
    if not resume:
        raise ValueError(f"checkpoint {checkpoint} exists; pass resume=True (CLI: --resume) to continue it, or delete it")
    meta, saved_shift, state = _load_checkpoint(checkpoint)
    if meta.get("key") != key:
        raise StaleCheckpointError(
            f"checkpoint {checkpoint} was written for other data or settings (the source changed since?); "
            "delete it to start over"
        )
    shift.copy_(saved_shift)
    stats.shift = shift.clone()
    stats.load_state(state)
    reader.skipped = meta["skipped"]
    if not source.rereadable and meta["next_chunk"]:
        raise ValueError("a one-shot iterator cannot be resumed; pass a list or a file")
    return meta["pass"], meta["next_chunk"]


def _check_counts(count: torch.Tensor, skipped: int, n_subclasses: int) -> None:
    """Every class needs S + 1 rows; no rows at all because every row was skipped says so."""
    if int(count.sum()) == 0 and skipped > 0:
        raise ValueError(f"every row was skipped ({skipped} rows with NaN/Inf under nan_policy='skip'): "
                         "no rows left to fit on")
    for cls in range(count.shape[0]):
        n_c = int(count[cls])
        if n_c < n_subclasses + 1:
            raise ValueError(
                f"class {cls} has {n_c} rows but n_subclasses={n_subclasses} needs at least "
                f"{n_subclasses + 1}; lower n_subclasses or add rows of that class"
            )


def _check_class_ranks(evals: torch.Tensor, total: torch.Tensor, n_subclasses: int) -> None:
    """Every class needs S directions of nonzero variance (standardising divides by their spread)."""
    for cls in range(evals.shape[0]):
        top = float(evals[cls].max()) if evals.shape[1] else 0.0
        nonzero = int((evals[cls] > max(top, 1e-300) * 1e-10).sum())
        if nonzero < n_subclasses:
            share = top / max(float(total[cls]), 1e-300)
            why = ("nearly all of its variance lies in one direction, as when a few rows hold huge values: look for "
                   "outliers in that class's rows (max |value|), or lower n_subclasses" if share > 0.999
                   else "lower n_subclasses or check that class's rows")
            raise ValueError(f"class {cls} has only {nonzero} direction(s) with nonzero variance (after the null-space "
                             f"projection) but n_subclasses={n_subclasses}; {why}")


# The statistics multiply values in fp32 (the exact Gram, the sketch): a value past ~1e18 squares
# to more than fp32 holds.
LARGEST_VALUE = 1e18


def _check_statistics_finite(additive: dict, source) -> None:
    """Overflowed statistics are an error naming the value behind them (a finite embedding too
    large for fp32 products), not an eigensolver's failure."""
    if all(bool(torch.isfinite(t).all()) for t in additive.values()):
        return
    where = ""
    if source.rereadable:  # an error path: one more read to name the row
        for chunk in source.chunks():
            big = chunk.embeddings.float().abs().amax(dim=1) > LARGEST_VALUE
            if bool(big.any()):
                row = int(torch.nonzero(big)[0])
                value = float(chunk.embeddings[row].float().abs().max())
                where = f": embeddings row {chunk.start_row + row} holds {value:.3g}"
                break
    raise ValueError(f"the fit's statistics overflowed{where}; embedding values must stay below {LARGEST_VALUE:.0e} "
                     "in magnitude (fp32 products): rescale the embeddings or drop that row")


def _check_ranks_agree(start_pass: int, checkpoint: str, process_group) -> None:
    """All ranks must resume in the same pass: the statistics are summed across ranks at the end of
    every pass, so a rank killed after that sum (its checkpoint already in the next pass) and one
    killed before it cannot be combined. Refused on every rank before anything is written."""
    import torch.distributed as dist

    passes: list = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(passes, start_pass, group=process_group)
    if len(set(passes)) > 1:
        base = checkpoint.rsplit(".rank", 1)[0]
        raise ValueError(f"the ranks' checkpoints resume in different passes ({passes}, by rank): a rank was "
                         f"killed after the end-of-pass sum and another before it; delete {base}.rank* and "
                         "start the fit over")


def _prepend(first, rest):
    yield first
    yield from rest
