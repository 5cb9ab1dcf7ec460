"""Capture: run a teacher over a data loader and store what LELP needs, as resumable shards.

Per batch the teacher gives its final-layer embeddings, its class logits and the labels; every
``batches_per_shard`` batches become one safetensors shard (``embeddings`` in ``dtype``,
``teacher_logits`` fp32, ``labels`` int64), written atomically and recorded with its sha256 in
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
from typing import Callable, Iterable, Optional, Tuple, Union

import torch
from torch import nn

from .._checks import check_finite
from .._dist import barrier, rank_world
from ..io.integrity import tensors_sha256
from ..io.locks import lock_rank_directory
from ..offline import manifest as mf
from ..offline import shards

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
) -> dict:
    """Runs ``model`` over ``loader`` and writes embeddings, teacher logits and labels to ``out_dir``.

    Args:
        model: the teacher (any ``nn.Module``), moved to ``device`` and put in eval mode.
        loader: an iterable of batches (a ``DataLoader`` without shuffling): ``(inputs, labels)``
            for the default forward, anything ``forward`` takes otherwise.
        out_dir: the capture directory (shards, ``head.safetensors``, ``manifest.json``).
        layer: name of the module whose output is the embedding (default: the head's input).
        head: the teacher's linear head (a name, a module, ``"auto"`` = the last ``nn.Linear``, or
            None); its ``W, b`` are stored for the fit's null-space projection.
        forward: ``forward(model, batch) -> (embeddings (B, d), logits (B, C), labels (B,))`` for
            models the hooks do not fit (e.g. a transformers model with a tokenizer batch).
        dtype: storage dtype of the embeddings ("float16", "bfloat16" or "float32").
        batches_per_shard: batches per shard (the unit of resumption).
        device: where the teacher runs; ``autocast``: "float16"/"bfloat16" runs it under autocast.
        process_group: torch.distributed group (shard i on rank i % world; one manifest).
        progress: a progress bar (batches).
    Returns:
        the manifest (dict).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if not isinstance(batches_per_shard, int) or batches_per_shard < 1:
        raise ValueError(f"batches_per_shard must be a positive integer, got {batches_per_shard!r}")
    if autocast not in (None, "float16", "bfloat16"):
        raise ValueError(f"autocast must be None, 'float16' or 'bfloat16', got {autocast!r}")
    rank, world = rank_world(process_group)
    device = torch.device(device)
    model = model.to(device).eval()
    head_module = find_head(model, head) if forward is None or head not in (None, "auto") else None
    settings = {"model_sha256": tensors_sha256(model.state_dict()),  # a changed teacher is noticed "layer": layer, "head": _describe(head_module),
                "forward": None if forward is None else getattr(forward, "__qualname__", repr(forward)),
                "dtype": dtype, "batches_per_shard": batches_per_shard, "autocast": autocast}
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    with lock_rank_directory(out_dir, rank, world, f"capture directory {out_dir}"):
        existing = mf.finished_run(out_dir, settings, True, rank, process_group, KIND)
        if existing is not None:
            return existing
        shards.remove_stale_temp_files(out_dir, rank)
        if rank == 0 and head_module is not None and isinstance(head_module, nn.Linear):
            _write_head(out_dir, head_module)
        run = forward or _HookedForward(model, layer, head_module)
        try:
            _capture_batches(model, loader, out_dir, settings, run, device, autocast, rank, world, progress)
        finally:
            if isinstance(run, _HookedForward):
                run.close()
        barrier(process_group)
        result = None
        if rank == 0:
            done = mf.finished_shards(out_dir, settings, checksums=False, kind=KIND)
            result = mf.write_manifest(out_dir, {**settings, "n_rows": None}, _renumber(done), kind=KIND)
        barrier(process_group)
        return result if rank == 0 else mf.read_manifest(out_dir, KIND)


def _capture_batches(model, loader, out_dir, settings, run, device, autocast, rank, world, progress) -> None:
    """Runs the batches of this rank's unfinished shards and writes them shard by shard."""
    done = mf.finished_shards(out_dir, settings, kind=KIND)
    entries = mf.own_progress(out_dir, rank, KIND)
    per_shard = settings["batches_per_shard"]
    bar = _bar(progress and rank == 0)
    pending, shard_index = [], 0
    amp = (torch.autocast(device.type, dtype=DTYPES[autocast]) if autocast else contextlib.nullcontext())
    for b, batch in enumerate(loader):
        shard_index = b // per_shard
        mine = shard_index % world == rank and shard_index not in done
        if mine:
            with torch.no_grad(), amp:
                emb, logits, labels = run(model, _to(batch, device))
            pending.append(_checked(emb, logits, labels, shard_index))
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


def _checked(emb, logits, labels, shard_index):
    labels = torch.as_tensor(labels)
    if emb.ndim != 2 or logits.ndim != 2 or labels.ndim != 1 or not emb.shape[0] == logits.shape[0] == labels.shape[0]:
        raise ValueError(f"shard {shard_index}: forward gave embeddings {tuple(emb.shape)}, logits "
                         f"{tuple(logits.shape)}, labels {tuple(labels.shape)}; expected (B, d), (B, C), (B,)")
    if labels.dtype.is_floating_point:
        raise ValueError(f"shard {shard_index}: labels must be integers, got {labels.dtype}")
    check_finite("teacher embeddings", emb.float())
    check_finite("teacher logits", logits.float())
    return emb.detach().float().cpu(), logits.detach().float().cpu(), labels.detach().to(torch.int64).cpu()


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
            "files": {"capture": {"file": name, "bytes": len(blob), "sha256": shards.sha256(blob)}}}


def _renumber(done: dict) -> dict:
    """Shard row ranges in shard order (each was recorded as [0, rows))."""
    start, out = 0, {}
    for index in sorted(done):
        rows = done[index]["rows"][1] - done[index]["rows"][0]
        out[index] = {**done[index], "rows": [start, start + rows]}
        start += rows
    return out


def _write_head(out_dir: str, head: nn.Linear) -> None:
    from safetensors.torch import save

    w = head.weight.detach().float().cpu().contiguous()
    b = (head.bias.detach().float().cpu() if head.bias is not None else torch.zeros(w.shape[0])).contiguous()
    shards.write_atomically(os.path.join(out_dir, HEAD_FILE), save({"weight": w, "bias": b}))


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


def _bar(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="capture", unit="batch")
