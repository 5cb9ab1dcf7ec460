"""Offline target generation: read chunks, compute targets with the fused kernels, write shards.

Reading (a prefetch thread), computing (the kernels, this thread) and writing (a writer thread)
overlap. Every shard is written atomically and recorded in this rank's progress file only after
it is complete, so a run killed at any moment and started again with the same arguments skips
the recorded shards, redoes the rest, and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Deque, Optional

import torch

from .._checks import NonFiniteRowError, check_finite, require_device
from .._dist import barrier, default_group, rank_world
from ..io import checksum
from ..io.device_copy import stage_ahead
from ..io.locks import lock_rank_directory
from ..io.prefetch import prefetch
from ..io.sources import DEFAULT_CHUNK_BYTES, Chunk, EmbeddingSource, SourceLike, as_source
from ..kernels.triton import limits
from ..ops.targets import overflow_error
from . import manifest as mf
from . import shards


def generate_targets(
    projector,
    source: SourceLike,
    out_dir: str,
    *,
    format: str = "npy",
    dtype: str = shards.DEFAULT_DTYPE,
    compact: bool = False,
    beta: Optional[float] = None,
    tau: Optional[float] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: str = "auto",
    device: Optional[str] = None,
    process_group=None,
    progress: bool = False,
    verify: bool = True,
) -> dict:
    """Writes LELP log-targets for every row of ``source`` into ``out_dir``; returns the manifest.

    Args:
        projector: a fitted :class:`~lelp_fast.LELPProjector`.
        source: embeddings (any source of the fit engine: arrays, .npy/.safetensors/.parquet
            paths, sources, iterables of chunks); teacher logits from the source when it has
            them, else from the projector's stored head.
        out_dir: output directory: shards ``shard-XXXXXX.*`` and ``manifest.json``.
        format: "npy" (memory-mappable), "safetensors" or "parquet".
        dtype: "float16" (default), "bfloat16" or "float32".
        compact: store ``u`` (N x K) and the teacher logits (N x C) instead of ``log t``, so β and
            τ can be chosen at training time (``TargetsDataset(..., beta=, tau=)``).
        beta, tau: temperatures (default: the projector's); not used by the compact form.
        chunk_bytes: embeddings per chunk (one chunk = one shard); bounds the memory in use.
        backend: kernel backend for the targets ("auto", "torch", "cpu", "cuda", "triton").
        device: where to compute; default CPU. On "cuda" each chunk goes through reusable pinned
            buffers on a side stream, the next chunk's copy overlapping this chunk's compute.
        process_group: torch.distributed group: chunk i is done by rank i % world; one manifest.
        progress: show a progress bar (rows/s, GB/s, ETA).
        verify: when ``out_dir`` is already finished, check every shard's checksum (one read of the
            outputs) before reporting success; False checks sizes only. Missing or corrupt shards
            are rewritten.

    The run holds an exclusive lock on ``out_dir`` (per rank) from start to end: a second run on
    the same directory fails at once with an error naming the holder; a lock left by a killed run
    is free again (the kernel drops it with its process).
    """
    shards.check_format(format, dtype)
    if device is not None:
        require_device("device", device)
    projector._require_fitted()
    src = as_source(source)
    if src.dim is not None and src.dim != projector.dim:
        raise ValueError(f"the source has d={src.dim} but the projector was fitted with d={projector.dim}")
    projector.require_same_teacher(src)
    process_group = default_group(process_group)  # torchrun's when none is given
    rank, world = rank_world(process_group)
    settings = _settings(projector, src, format, dtype, compact, beta, tau, chunk_bytes)

    def compute(chunk, h, z):
        return _compute(projector, chunk, h, z, settings, backend)

    return run_in_directory(out_dir, compute, src, settings, chunk_bytes, device, process_group, rank, world,
                            progress, verify)


def run_in_directory(out_dir, compute, src, settings, chunk_bytes, device, process_group, rank, world, progress,
                     verify) -> dict:
    """``_generate`` in ``out_dir``, locked; a directory this run made and left empty (it failed before
    writing anything: a bad backend, say) is removed, where a partial run is kept to be resumed."""
    made = not os.path.exists(out_dir)
    out_dir = _prepare_directory(out_dir, rank)
    try:
        with lock_rank_directory(out_dir, rank, world, f"output directory {out_dir}"):
            return _generate(compute, src, out_dir, settings, chunk_bytes, device, process_group, rank, world,
                             progress, verify)
    except BaseException:
        if made:
            try:
                os.rmdir(out_dir)  # fails, as it should, on anything written (or another rank's lock)
            except OSError:
                pass
        raise


def _generate(compute, src, out_dir, settings, chunk_bytes, device, process_group, rank, world, progress,
              verify) -> dict:
    """The shared engine: ``compute(chunk, h, z) -> {field: tensor}`` per chunk not done yet, written
    as shards under the lock the caller holds (LELP targets, or plain teacher outputs)."""
    shards.remove_stale_temp_files(out_dir, rank)  # left by a killed run of this rank (we hold its lock)
    existing = mf.finished_run(out_dir, settings, verify, rank, process_group)
    if existing is not None:  # same settings and intact shards: nothing to do
        return existing
    done = mf.finished_shards(out_dir, settings)
    if done and not src.rereadable:
        raise ValueError(f"{out_dir} holds a partial run, but the source is a one-shot iterable that cannot be "
                         "read again; remove the directory to start over")
    first = _first_missing(done, rank, world)
    writer = _ShardWriter(out_dir, rank, settings, mf.own_progress(out_dir, rank))
    bar = _progress_bar(src, progress and rank == 0, done, "targets" if settings.get("kind", "lelp") == "lelp"
                        else "teacher outputs")
    started, read_bytes = time.perf_counter(), 0
    try:
        chunks = prefetch(src.chunks(chunk_bytes, skip=first, rank=rank, world=world))
        todo = ((chunk, (chunk.embeddings, chunk.teacher_logits)) for chunk in chunks
                if chunk.index not in done)  # done: recorded by any rank, also under another world size
        if device is not None and torch.device(device).type == "cuda":
            todo = stage_ahead(todo, device)  # reusable pinned buffers; chunk i + 1's copy overlaps chunk i
        for chunk, (h, z) in todo:
            tensors = compute(chunk, h, z)
            if chunk.labels is not None:  # a reader joining a dataset checks its rows against them
                tensors[shards.LABELS] = shards.row_labels(chunk.labels)
            writer.submit(chunk, tensors)
            if bar is not None:
                read_bytes += chunk.embeddings.numel() * chunk.embeddings.element_size()
                # Rank 0 shows its rows times the world size: the ranks share the chunks evenly.
                bar.update(min(chunk.embeddings.shape[0] * world, (bar.total or 1 << 62) - bar.n))
                bar.set_postfix_str(f"{read_bytes / max(1e-9, time.perf_counter() - started) / 1e9:.2f} GB/s")
        writer.close()
        if bar is not None and bar.total:
            bar.update(bar.total - bar.n)  # finished: every rank's share is done
    finally:
        writer.abort()
        if bar is not None:
            bar.close()
    return _finish(out_dir, settings, process_group, rank)


def _settings(projector, src: EmbeddingSource, format, dtype, compact, beta, tau, chunk_bytes) -> dict:
    """What the outputs depend on: a resume or a rerun must see exactly the same."""
    return {
        "projector_sha256": mf.projector_digest(projector),
        "source_fingerprint": src.fingerprint(),
        "n_rows": src.n_rows,
        "dim": projector.dim,
        "num_classes": projector.num_classes,
        "n_subclasses": projector.n_subclasses,
        "K": projector.n_outputs,
        "beta": None if compact else float(projector.beta if beta is None else beta),
        "tau": None if compact else float(projector.tau if tau is None else tau),
        "dtype": dtype,
        "format": format,
        "compact": bool(compact),
        "chunk_bytes": int(chunk_bytes),
    }


def _prepare_directory(out_dir: str, rank: int) -> str:
    out_dir = os.path.abspath(os.fspath(out_dir))
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=shards.temp_prefix(rank), dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OSError(exc.errno, f"output directory {out_dir} is not writable ({exc.strerror})") from exc
    return out_dir


def _first_missing(done: dict, rank: int, world: int) -> int:
    """The first chunk index of this rank that is not done (chunks before it are not read)."""
    i = rank
    while i in done:
        i += world
    return i


def _compute(projector, chunk: Chunk, h, z, settings: dict, backend: str) -> dict:
    """The chunk's outputs from its embeddings h and teacher logits z (on the compute device)."""
    try:
        return _compute_rows(projector, chunk, h, z, settings, backend)
    except NonFiniteRowError as exc:  # name the row in the whole source, not in the chunk
        raise NonFiniteRowError(exc.name, chunk.start_row + exc.row) from None


def _compute_rows(projector, chunk: Chunk, h, z, settings: dict, backend: str) -> dict:
    if z is None and projector.head_weight is None:
        raise ValueError("the projector has no teacher head and the source has no teacher logits: give the "
                         "source teacher logits, or fit the projector with head_weight/head_bias")
    if h.shape[1] != projector.dim:
        raise ValueError(f"rows {chunk.start_row}..: embeddings have d={h.shape[1]}, the projector d={projector.dim}")
    if z is not None and (z.ndim != 2 or z.shape != (h.shape[0], projector.num_classes)):
        raise ValueError(f"rows {chunk.start_row}..: teacher logits have shape {tuple(z.shape)}, expected "
                         f"({h.shape[0]}, {projector.num_classes}) (C of the projector)")
    out_dtype = shards.DTYPES[settings["dtype"]]
    if settings["compact"]:
        k = projector.n_outputs
        weight, bias = projector.fused_map(with_head=z is None)
        proj = h.to(torch.float32) @ weight.to(h.device, torch.float32) + bias.to(h.device, torch.float32)
        suspects = torch.nonzero(~torch.isfinite(proj.sum(1))).flatten()  # as the CPU kernel: NaN/Inf rows show here
        if suspects.numel():
            check_finite("embeddings", h, suspects)
        if z is not None:
            check_finite("teacher_logits", z)
        tensors = {"u": proj[:, :k], "teacher_logits": proj[:, k:] if z is None else z}
    else:
        tensors = {"log_targets": projector.targets(h, z, beta=settings["beta"], tau=settings["tau"],
                                                    out_dtype=out_dtype, backend=backend)}
    out = {name: shards.to_stored(name, t, out_dtype, chunk.start_row, "dtype (targets.dtype)").cpu()
           for name, t in tensors.items()}
    if "log_targets" in out and not _targets_op_checks(h):
        _check_target_rows(out["log_targets"], h, z, chunk.start_row,
                           vanilla_kd=limits.vanilla_kd(projector.n_subclasses, z is not None))
    return out


def _targets_op_checks(h: torch.Tensor) -> bool:
    """Whether the targets op checked these inputs itself (CPU tensors; on a GPU a check is a sync)."""
    return h.device.type == "cpu"


def _check_target_rows(log_targets: torch.Tensor, h: torch.Tensor, z, start_row: int, vanilla_kd: bool) -> None:
    """Names the bad input row behind a NaN or +Inf target (-inf is a target of 0), for inputs the
    targets op did not check: here the rows are on the host anyway. ``vanilla_kd`` (S = 1 with given
    logits): the targets depend on the logits alone."""
    suspects = torch.nonzero((torch.isnan(log_targets) | torch.isposinf(log_targets)).any(1)).flatten()
    if not suspects.numel():
        return
    if vanilla_kd:
        check_finite("teacher_logits", z, suspects.to(z.device))
        raise overflow_error(start_row + int(suspects[0]), vanilla_kd=True)
    check_finite("embeddings", h, suspects.to(h.device))
    if z is not None:
        check_finite("teacher_logits", z, suspects.to(z.device))
    raise ValueError(f"embeddings row {start_row + int(suspects[0])} is finite but its targets are not: its projection "
                     "overflows float32; rescale the embeddings or check the projector")


class _ShardWriter:
    """One background thread writes shards in order and records each in the progress file."""

    def __init__(self, out_dir: str, rank: int, settings: dict, recorded: list, max_pending: int = 2):
        self.out_dir, self.rank, self.settings = out_dir, rank, settings
        self.entries = list(recorded)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lelp-writer")
        self.pending: Deque[Future] = deque()
        self.max_pending = max_pending
        self.failed = False

    def submit(self, chunk: Chunk, tensors: dict) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()  # re-raises a failed write (disk full, ...)
        self.pending.append(self.pool.submit(self._write, chunk.index, chunk.start_row, tensors))

    def _write(self, index: int, start_row: int, tensors: dict) -> None:
        if self.failed:  # after a failed write (disk full, ...) the queued ones are not attempted
            return
        try:
            self._write_shard(index, start_row, tensors)
        except BaseException:
            self.failed = True
            raise

    def _write_shard(self, index: int, start_row: int, tensors: dict) -> None:
        s = self.settings
        names = shards.shard_files(s["format"], index, s["compact"], list(tensors))
        data = shards.encode(s["format"], tensors, start_row)
        files = {}
        for key, blob in data.items():
            shards.write_atomically(os.path.join(self.out_dir, names[key]), blob, self.rank)
            files[key] = {"file": names[key], "bytes": len(blob), **checksum.record(blob)}
        n = next(iter(tensors.values())).shape[0]
        self.entries.append({"index": index, "rows": [start_row, start_row + n], "files": files})
        mf.write_progress(self.out_dir, self.rank, s, self.entries)  # the shard counts only from here

    def close(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def abort(self) -> None:
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True)


def _progress_bar(src: EmbeddingSource, enabled: bool, done: dict, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    already = sum(e["rows"][1] - e["rows"][0] for e in done.values())
    return tqdm(total=src.n_rows, initial=already, desc=desc, unit="rows", unit_scale=True)


def _finish(out_dir: str, settings: dict, process_group, rank: int) -> dict:
    barrier(process_group)
    if rank == 0:  # sizes re-checked (cheap); the checksums were taken from the bytes this run wrote
        result = mf.write_manifest(out_dir, settings, mf.finished_shards(out_dir, settings, checksums=False))
    barrier(process_group)
    return result if rank == 0 else mf.read_manifest(out_dir)
