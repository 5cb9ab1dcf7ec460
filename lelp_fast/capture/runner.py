"""Capture: run a teacher over a data loader and store what LELP needs, as resumable shards.

Per batch the teacher gives its final-layer embeddings, its class logits and the labels; every
``batches_per_shard`` batches become one safetensors shard (``embeddings`` in ``dtype``,
``teacher_logits`` fp32, ``labels`` int64), written atomically and recorded with its checksums in
this rank's progress file; the teacher head ``W, b`` goes to ``head.safetensors`` when the head is
a linear layer. When every shard exists, ``manifest.json`` (kind ``lelp_fast.capture``) lists them.

The directory is the same kind of thing the offline targets write: locked by the run, resumable
after a kill (the finished shards are skipped, their batches are read but not run through the
teacher), checked against its settings, and read back by :class:`~lelp_fast.io.CaptureSource`, which
``fit`` and ``generate_targets`` take directly. The loader must yield the same batches in the same
order on every run and every rank (no shuffling); under torchrun shard ``i`` is done by rank
``i % world``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Callable, Iterable, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from .._checks import NonFiniteRowError, check_finite, require_device
from .._dist import barrier, default_group, rank_world
from ..io import checksum
from ..io.integrity import tensors_sha256
from ..io.locks import lock_rank_directory
from ..offline import manifest as mf
from ..offline import shards
from ..offline.dataset import IGNORE_INDEX

KIND = "lelp_fast.capture"
HEAD_FILE = "head.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ForwardFn = Callable[[nn.Module, object], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def find_head(model: nn.Module, head: Union[str, nn.Module, None] = "auto") -> Optional[nn.Module]:
    """The teacher head: a named submodule, a module, or (``"auto"``) the last ``nn.Linear``."""
    if head is None or isinstance(head, nn.Module):
        return head
    if head != "auto":
        try:
            return model.get_submodule(head)
        except AttributeError as exc:
            raise ValueError(f"head={head!r}: the model has no submodule of that name") from exc
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("head='auto' found no nn.Linear in the model; name the head module or pass forward=")
    return linears[-1]


class _HookedForward:
    """Default forward: ``batch = (inputs, labels)``; logits = model(inputs) (``model(**inputs).logits``
    for a dict of tensors, e.g. a tokenised batch); embeddings = the input of
    ``head`` (a forward pre-hook) or the output of module ``layer`` (a forward hook), flattened."""

    def __init__(self, model: nn.Module, layer: Optional[str], head: Optional[nn.Module]):
        self.seen: Optional[torch.Tensor] = None
        if layer is not None:
            try:
                module = model.get_submodule(layer)
            except AttributeError as exc:
                raise ValueError(f"layer={layer!r}: the model has no submodule of that name") from exc
            self.handle = module.register_forward_hook(lambda m, args, out: self._keep(out))
        elif head is not None:
            self.handle = head.register_forward_pre_hook(lambda m, args: self._keep(args[0]))
        else:
            raise ValueError("give layer= (the module whose output is the embedding), a linear head, or forward=")

    def _keep(self, value) -> None:
        self.seen = value[0] if isinstance(value, (tuple, list)) else value

    def __call__(self, model: nn.Module, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("the default forward takes batches (inputs, labels); pass forward= for other batches")
        inputs, labels = batch[0], batch[1]
        self.seen = None
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)  # a dict: a tokenised batch
        logits = getattr(out, "logits", out)  # transformers models return an output object
        if self.seen is None:
            raise ValueError("the embedding hook did not fire: the layer/head is not used by model(inputs)")
        return self.seen.flatten(1), logits, labels

    def close(self) -> None:
        self.handle.remove()


def capture(
    model: nn.Module,
    loader: Iterable,
    out_dir: str,
    *,
    layer: Optional[str] = None,
    head: Union[str, nn.Module, None] = "auto",
    forward: Optional[ForwardFn] = None,
    dtype: str = "float16",
    batches_per_shard: int = 16,
    device: Union[str, torch.device] = "cpu",
    autocast: Optional[str] = None,
    process_group=None,
    progress: bool = False,
    data: Optional[str] = None,
) -> dict:
    """Runs ``model`` over ``loader`` and writes embeddings, teacher logits and labels to ``out_dir``.

    Args:
        model: the teacher (any ``nn.Module``), moved to ``device`` and put in eval mode.
        loader: an iterable of batches (a ``DataLoader`` without shuffling): ``(inputs, labels)``
            for the default forward, anything ``forward`` takes otherwise.
        out_dir: the capture directory (shards, ``head.safetensors``, ``manifest.json``).
        layer: name of the module whose output is the embedding (default: the head's input).
        head: the teacher's linear head (a name, a module, ``"auto"`` = the last ``nn.Linear``, or
            None); its ``W, b`` are stored for the fit's null-space projection. On the first
            batch, the head applied to the captured embeddings must give the model's logits, else
            the capture is refused (the module found is not the head: name it, or pass ``layer=``,
            ``forward=`` or ``head=None``).
        forward: ``forward(model, batch) -> (embeddings (B, d), logits (B, C), labels (B,))`` for
            models the hooks do not fit (e.g. a transformers model with a tokenizer batch). With
            ``forward=``, no head is stored unless ``head=`` names one.
        dtype: storage dtype of the embeddings ("float16", "bfloat16" or "float32").
        batches_per_shard: batches per shard (the unit of resumption).
        device: where the teacher runs; ``autocast``: "float16"/"bfloat16" runs it under autocast.
        process_group: torch.distributed group (shard i on rank i % world; one manifest).
        progress: a progress bar (batches).
        data: a fingerprint of the rows and how they are batched (``capture_text`` gives one of its
            table, tokenizer, max_length and batch_size); a capture of other data in ``out_dir``, finished
            or not, is then refused. Without it the loader's rows are not checked (a loader cannot be
            hashed without running it).
    Returns:
        the manifest (dict).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if not isinstance(batches_per_shard, int) or batches_per_shard < 1:
        raise ValueError(f"batches_per_shard must be a positive integer, got {batches_per_shard!r}")
    if autocast not in (None, "float16", "bfloat16"):
        raise ValueError(f"autocast must be None, 'float16' or 'bfloat16', got {autocast!r}")
    _check_in_order(loader)
    process_group = default_group(process_group)  # torchrun's when none is given
    rank, world = rank_world(process_group)
    device = require_device("device", device)
    model = model.to(device).eval()
    head_module = find_head(model, head) if forward is None or head not in (None, "auto") else None
    # model_sha256: a changed teacher is noticed; every key here that differs refuses a finished capture.
    settings = {"model_sha256": tensors_sha256(model.state_dict()), "layer": layer, "head": _describe(head_module),
                "forward": None if forward is None else getattr(forward, "__qualname__", repr(forward)),
                "dtype": dtype, "batches_per_shard": batches_per_shard, "autocast": autocast}
    out_dir = os.path.abspath(os.fspath(out_dir))
    with _made_for_this_run(out_dir), lock_rank_directory(out_dir, rank, world, f"capture directory {out_dir}"):
        _add_data(settings, data, out_dir)
        existing = mf.finished_run(out_dir, settings, True, rank, process_group, KIND)
        if existing is not None:
            if rank == 0 and isinstance(head_module, nn.Linear):
                _repair_head(out_dir, existing, head_module)
            barrier(process_group)  # no rank reads the head before it is repaired
            return existing
        shards.remove_stale_temp_files(out_dir, rank)
        run = forward or _HookedForward(model, layer, head_module)
        try:
            checks = _BatchChecks(dtype, head_module, _module_name(model, head_module))
            _capture_batches(model, loader, out_dir, settings, run, checks, device, autocast, rank, world, progress)
        finally:
            if isinstance(run, _HookedForward):
                run.close()
        barrier(process_group)
        result = None
        if rank == 0:
            # after the batches, which check it is the head; its checksum goes into the manifest
            head = _write_head(out_dir, head_module) if isinstance(head_module, nn.Linear) else None
            done = mf.finished_shards(out_dir, settings, checksums=False, kind=KIND)
            result = mf.write_manifest(out_dir, {**settings, "n_rows": None}, _renumber(done), kind=KIND,
                                       extra=None if head is None else {"head": head})
        barrier(process_group)
        return result if rank == 0 else mf.read_manifest(out_dir, KIND)


@contextlib.contextmanager
def _made_for_this_run(out_dir: str):
    """Makes ``out_dir`` if it is missing; if this run made it and fails before writing anything there
    (its first batch refused, say), removes it again: it left an empty directory behind. A partial
    capture's shards (or another rank's lock) keep it, to be resumed."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):  # was "[Errno 17] File exists"
        raise NotADirectoryError(f"out_dir {out_dir} (--out) is a file: name a directory for the capture's shards")
    made = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        yield
    except BaseException:
        if made:
            try:
                os.rmdir(out_dir)  # fails, as it should, on anything written
            except OSError:
                pass
        raise


def _add_data(settings: dict, data: Optional[str], out_dir: str) -> None:
    """``data`` into the settings a capture is checked against, but for a capture recorded before its
    rows had a fingerprint (session 58), which is kept, with a warning, rather than refused."""
    if data is None:
        return
    recorded = mf.recorded_settings(out_dir, KIND)
    if recorded is not None and "data" not in recorded:
        warnings.warn(f"{out_dir} was captured before captures recorded a fingerprint of their rows: its rows "
                      "are not checked against the data given now", UserWarning, stacklevel=3)
        return
    settings["data"] = data


def _check_in_order(loader) -> None:
    """Refuses a DataLoader that does not give every row in the data's order: one whose sampler draws
    rows at random, or a DistributedSampler of several ranks (each rank would see its share only;
    capture shares the shards among ranks itself). The targets made from the capture are matched to
    the training data row by row (``distill``, ``TargetsDataset``), and a resumed capture to its own
    shards."""
    samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    for sampler in samplers:
        if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)) or (
                isinstance(sampler, DistributedSampler) and sampler.shuffle):
            raise ValueError(f"loader draws its rows at random ({type(sampler).__name__}): the captured rows must "
                             "keep the data's order, which the targets are matched to row by row; pass a DataLoader "
                             "with shuffle=False")
        if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
            raise ValueError(f"loader gives this rank 1/{sampler.num_replicas} of the rows (DistributedSampler): every "
                             "rank must read the whole loader in order, since capture shares the shards among the "
                             "ranks itself; pass a DataLoader with shuffle=False and no DistributedSampler")


def _capture_batches(model, loader, out_dir, settings, run, checks, device, autocast, rank, world, progress) -> None:
    """Runs the batches of this rank's unfinished shards and writes them shard by shard."""
    done = mf.finished_shards(out_dir, settings, kind=KIND)
    entries = mf.own_progress(out_dir, rank, KIND)
    per_shard = settings["batches_per_shard"]
    bar = _bar(progress and rank == 0, loader)
    pending, shard_index, rows_before, batches = [], 0, 0, 0
    amp = (torch.autocast(device.type, dtype=DTYPES[autocast]) if autocast else contextlib.nullcontext())
    for b, batch in enumerate(loader):
        batches += 1
        shard_index = b // per_shard
        if shard_index % world == rank and shard_index not in done:
            with torch.no_grad(), amp:
                emb, logits, labels = run(model, _to(batch, device))
            pending.append(checks(emb, logits, labels, b, rows_before))
            rows = pending[-1][0].shape[0]
        else:  # another rank's or a finished shard's batch: only its size is needed
            rows = _batch_rows(batch)
        rows_before = None if rows is None or rows_before is None else rows_before + rows
        if bar is not None:
            bar.update(1)
        if (b + 1) % per_shard == 0 and pending:
            entries.append(_write_shard(out_dir, shard_index, pending, settings, rank))
            mf.write_progress(out_dir, rank, settings, entries, KIND)
            pending = []
    if pending:
        entries.append(_write_shard(out_dir, shard_index, pending, settings, rank))
        mf.write_progress(out_dir, rank, settings, entries, KIND)
    if bar is not None:
        bar.close()
    if batches == 0:
        raise ValueError("loader yielded no batches: there is nothing to capture (an empty dataset, or an iterator "
                         "that was already used up)")


def _batch_rows(batch) -> Optional[int]:
    """Rows of a batch not run here, from its labels (None when the batch does not show them)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and hasattr(batch[1], "__len__"):
        return len(batch[1])
    return None


def _where(row: int, rows_before: Optional[int], batch: int) -> str:
    return f"dataset row {rows_before + row} (batch {batch})" if rows_before is not None else f"batch {batch} row {row}"


class _BatchChecks:
    """Each batch's shapes, labels and values, errors naming the batch and the dataset row; on the
    first batch, that the stored head reproduces the model's logits from the captured embeddings."""

    def __init__(self, dtype: str, head: Optional[nn.Module], head_name: str):
        self.dtype, self.head, self.head_name, self.widths = DTYPES[dtype], head, head_name, None

    def __call__(self, emb, logits, labels, batch: int, rows_before: Optional[int]):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):  # strings ("too many dimensions 'str'"), ragged lists
            first = labels[0] if isinstance(labels, (list, tuple)) and labels else labels
            raise ValueError(f"batch {batch}: labels must be integer class indices, got {type(first).__name__} "
                             f"({first!r})") from None
        if emb.ndim != 2 or logits.ndim != 2 or labels.ndim != 1 or not emb.shape[0] == logits.shape[0] == labels.shape[0]:
            raise ValueError(f"batch {batch}: forward gave embeddings {tuple(emb.shape)}, logits "
                             f"{tuple(logits.shape)}, labels {tuple(labels.shape)}; expected (B, d), (B, C), (B,)")
        if labels.dtype.is_floating_point:
            raise ValueError(f"batch {batch}: labels must be integers, got {labels.dtype}")
        labels = labels.detach().to(torch.int64)  # as stored; uint8's 156 is no -100
        _check_labels(labels, logits.shape[1], batch, rows_before)
        widths = (emb.shape[1], logits.shape[1])
        if self.widths is None:
            self.widths = widths
            if isinstance(self.head, nn.Linear):
                check_head_matches(self.head, emb, logits, self.head_name)
        elif widths != self.widths:
            raise ValueError(f"batch {batch}: embeddings/logits are {widths[0]}/{widths[1]} wide, earlier batches "
                             f"{self.widths[0]}/{self.widths[1]}: every batch must give the same widths")
        emb, logits = emb.detach().float().cpu(), logits.detach().float().cpu()
        for name, values in (("teacher embeddings", emb), ("teacher logits", logits)):
            try:
                check_finite(name, values)
            except NonFiniteRowError as exc:
                raise ValueError(f"{name} {_where(exc.row, rows_before, batch)} contains NaN or Inf; repair or drop "
                                 "that row") from None
        _check_range(emb, self.dtype, batch, rows_before)
        return emb, logits, labels.cpu()


UNLABELLED = IGNORE_INDEX  # a row without a label: the loss's ignore_index (lelp_fast.ops.distill_loss)


def _check_labels(labels: torch.Tensor, num_classes: int, batch: int, rows_before: Optional[int]) -> None:
    """int64 labels in [0, C) or UNLABELLED: others (1..C, say) would be refused only by the fit, after
    the whole teacher pass. UNLABELLED rows are kept: a fit that assigns classes by the teacher
    (assign="teacher") takes them, and the loss leaves them out (its ignore_index)."""
    bad = torch.nonzero((labels != UNLABELLED) & ((labels < 0) | (labels >= num_classes))).flatten()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(f"label {int(labels[row])} of {_where(row, rows_before, batch)} is outside [0, "
                         f"{num_classes - 1}] (the teacher's {num_classes} classes; {UNLABELLED} marks a row without "
                         "a label)")


def _check_range(emb: torch.Tensor, dtype: torch.dtype, batch: int, rows_before: Optional[int]) -> None:
    """A value the storage dtype cannot hold would be stored as Inf: refuse it, naming the row."""
    limit = torch.finfo(dtype).max
    big = emb.abs().amax(dim=1) > limit if emb.numel() else torch.zeros(0, dtype=torch.bool)
    if bool(big.any()):
        row = int(torch.nonzero(big)[0])
        raise ValueError(f"teacher embeddings {_where(row, rows_before, batch)} hold {float(emb[row].abs().max()):.3g}, "
                         f"beyond {dtype} (max {limit:.3g}); capture with dtype='float32' or rescale the embeddings")


def check_head_matches(head: nn.Linear, emb: torch.Tensor, logits: torch.Tensor, name: str) -> None:
    """The stored head must turn the captured embeddings into the model's logits (else the head
    found is not the teacher's head, and the fit's null space would be wrong)."""
    w = head.weight.detach().float()
    b = None if head.bias is None else head.bias.detach().float()
    found = f"{name} (nn.Linear {w.shape[1]} -> {w.shape[0]})"
    fix = ("name the head with head='<module name>', the embedding with layer='<module name>', or pass forward=; "
           "head=None stores no head")
    if emb.shape[1] != w.shape[1] or logits.shape[1] != w.shape[0]:
        raise ValueError(f"the head found, {found}, does not fit embeddings {emb.shape[1]} wide and "
                         f"{logits.shape[1]} logits: it is not the teacher's head; {fix}")
    x, z = emb.detach().float().to(w.device), logits.detach().float().to(w.device)
    low_precision = (any(t.dtype != torch.float32 for t in (head.weight, emb, logits))
                     or torch.is_autocast_enabled())
    tol = 3e-2 if low_precision else 1e-3
    err = float((torch.nn.functional.linear(x, w, b) - z).abs().max()) if x.numel() else 0.0
    if err > tol * (1.0 + float(z.abs().max())):
        raise ValueError(f"the head found, {found}, applied to the captured embeddings misses the model's logits "
                         f"by {err:.3g}: it is not the teacher's head; {fix}")


def _write_shard(out_dir, index, pending, settings, rank) -> dict:
    """One shard from its batches; rows are numbered later (ranks do not know each other's sizes)."""
    from safetensors.torch import save

    emb = torch.cat([p[0] for p in pending]).to(DTYPES[settings["dtype"]])
    logits = torch.cat([p[1] for p in pending])
    labels = torch.cat([p[2] for p in pending])
    blob = save({"embeddings": emb.contiguous(), "teacher_logits": logits.contiguous(), "labels": labels},
                metadata={"kind": KIND})
    name = f"shard-{index:06d}.safetensors"
    shards.write_atomically(os.path.join(out_dir, name), blob, rank)
    return {"index": index, "rows": [0, emb.shape[0]],
            "files": {"capture": {"file": name, "bytes": len(blob), **checksum.record(blob)}}}


def _renumber(done: dict) -> dict:
    """Shard row ranges in shard order (each was recorded as [0, rows))."""
    start, out = 0, {}
    for index in sorted(done):
        rows = done[index]["rows"][1] - done[index]["rows"][0]
        out[index] = {**done[index], "rows": [start, start + rows]}
        start += rows
    return out


def _head_file(head: nn.Linear) -> Tuple[bytes, dict]:
    """The head's ``W, b`` as a safetensors file, and its record (size and checksums) for the manifest."""
    from safetensors.torch import save

    w = head.weight.detach().float().cpu().contiguous()
    b = (head.bias.detach().float().cpu() if head.bias is not None else torch.zeros(w.shape[0])).contiguous()
    blob = save({"weight": w, "bias": b})
    return blob, {"file": HEAD_FILE, "bytes": len(blob), **checksum.record(blob)}


def _write_head(out_dir: str, head: nn.Linear) -> dict:
    blob, record = _head_file(head)
    shards.write_atomically(os.path.join(out_dir, HEAD_FILE), blob)
    return record


def _repair_head(out_dir: str, manifest: dict, head: nn.Linear) -> None:
    """A finished capture's damaged head file rewritten from the teacher (the settings matched, so the
    same teacher: the same bytes); captures recorded before the head had a checksum are left as they are."""
    problem = mf.file_problem(out_dir, manifest["head"]) if "head" in manifest else None
    if problem:
        blob, record = _head_file(head)
        if record != manifest["head"]:  # e.g. another safetensors' layout: nothing is overwritten
            raise ValueError(f"{problem}, and the teacher's head does not serialise to the recorded bytes; "
                             f"remove {out_dir} to capture again")
        warnings.warn(f"{problem}; rewriting it from the teacher", RuntimeWarning, stacklevel=3)
        shards.write_atomically(os.path.join(out_dir, HEAD_FILE), blob)


def _module_name(model: nn.Module, module: Optional[nn.Module]) -> str:
    names = [name for name, m in model.named_modules() if m is module]
    return repr(names[0]) if names else "the head given"


def _describe(head: Optional[nn.Module]) -> Optional[str]:
    if head is None:
        return None
    return json.dumps({"type": type(head).__name__, "shape": list(head.weight.shape)
                       if isinstance(head, nn.Linear) else None})


def _to(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _bar(enabled: bool, loader):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(desc="capture", unit="batch", total=total)
