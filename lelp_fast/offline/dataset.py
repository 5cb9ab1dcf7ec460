"""Training from stored targets: memory-mapped shards joined to the training data by row index.

A batch is gathered, not assembled row by row: :meth:`TargetsDataset.batch` indexes each shard's
mapped array once with the batch's rows, and gathers the training inputs the same way when they are
tensors (a ``TensorDataset``), so a step costs a few vectorised copies instead of one Python call
per row and a collate. :func:`batch_loader` is the ``DataLoader`` that feeds such batches.
"""

from __future__ import annotations

import numbers
import os
from collections import OrderedDict
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torch.utils.data import default_collate

from .. import reference
from .._checks import check_count
from . import manifest as mf
from . import shards
from .teacher_store import dense_topk_log_targets

# Shards kept open: a mapping costs a file descriptor (two for compact npy) and address space, not
# memory, so training that draws each batch from every shard keeps them all up to this many (past
# it a shard is mapped again, not hashed again); decoded Parquet shards cost memory.
MAX_OPEN = {"npy": 128, "safetensors": 128, "parquet": 2}
# Stores up to this size are read into memory for training (TargetsDataset.read_into_memory).
IN_MEMORY_BYTES = 1 << 30


class TargetsDataset(Dataset):
    """Row ``i`` of the stored targets, optionally joined to row ``i`` of another dataset.

    ``TargetsDataset(dir)[i]`` is the (K,) log-target row (in the stored dtype; the fused loss
    reads fp16/bf16 directly). ``TargetsDataset(dir, dataset)[i]`` is ``(dataset[i], log_t_i)``.
    ``batch(rows)`` gives the same for many rows at once, gathered (what :func:`batch_loader` and
    ``distill`` use). Compact outputs (``u`` and teacher logits) are turned into log-targets at the
    ``beta`` and ``tau`` given here (fp32), as are plain teacher outputs (``store_teacher_outputs``:
    logits at the ``tau`` given here, or top-k log-probabilities made dense). ``.npy`` and
    ``.safetensors`` shards are memory-mapped.

    Args:
        directory: a finished ``generate_targets`` / ``lelp-fast targets`` output directory.
        dataset: optional map-style dataset (or tensor) with exactly the same number of rows.
        beta, tau: temperatures for compact outputs (both required), stored logits (tau required);
            refused for outputs written at fixed temperatures.
        verify: check each shard's checksum (XXH3-128) on its first read, on the bytes the tensors
            are read from (one pass over each file, during training rather than before it); a
            mismatch is an error naming the file. ``verify=False`` skips the hashes; sizes are
            always checked.
        check_labels: where the targets store their source's labels (written since session 65
            from a source with labels: a capture, arrays with labels), compare them with the
            labels of the ``dataset`` rows joined to them (``(inputs, label, ...)`` items, or dicts
            with ``"labels"``/``"label"``): a dataset in another order, or filtered, is refused
            naming the row instead of training each row on another row's targets. Pass False
            when an item's second element is not its label.
    """

    def __init__(self, directory: str, dataset: Optional[Sequence] = None, *, beta: Optional[float] = None,
                 tau: Optional[float] = None, verify: bool = True, check_labels: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"targets directory {self.directory} does not exist")
        manifest = mf.read_manifest(self.directory)
        if manifest is None:
            raise ValueError(f"{self.directory} has no {mf.MANIFEST}: the targets run did not finish; rerun the same "
                             "command to complete it")
        self.settings = manifest["settings"]
        self.shards = manifest["shards"]
        self.n_rows = manifest["n_rows"]
        if dataset is not None and len(dataset) != self.n_rows:
            raise ValueError(f"dataset has {len(dataset)} rows but the targets in {self.directory} have {self.n_rows}")
        _check_temperatures(self.settings, beta, tau)
        for entry in self.shards:  # sizes now (a stat per file); each checksum when the shard is first read
            mf.verify_shard(self.directory, entry, checksums=False)
        self.dataset, self.beta, self.tau, self.verify = dataset, beta, tau, bool(verify)
        self.check_labels = bool(check_labels) and dataset is not None
        self._stores = f"the targets in {self.directory}"  # named by require_same_rows
        self._starts = [e["rows"][0] for e in self.shards]
        self._starts_array = np.array(self._starts, dtype=np.int64)
        self._verified: set = set()
        self._cache: OrderedDict = OrderedDict()
        self._in_memory: Optional[torch.Tensor] = None  # every row's log-targets, once read_into_memory ran
        self._labels_in_memory: Optional[torch.Tensor] = None  # and their stored labels (-100: none)

    def __len__(self) -> int:
        return self.n_rows

    def __getstate__(self) -> dict:
        # DataLoader workers get the dataset pickled: send the paths (and which shards passed their
        # checksum), not the mapped shards.
        return {**self.__dict__, "_cache": OrderedDict()}

    def _shard(self, s: int) -> dict:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        if len(self._cache) >= MAX_OPEN[self.settings["format"]]:
            self._cache.popitem(last=False)
        entry = self.shards[s]
        files = {k: v["file"] for k, v in entry["files"].items()}
        checksums = entry["files"] if self.verify and s not in self._verified else None
        writer = ("teacher-outputs command (store_teacher_outputs)" if self.settings.get("kind", "lelp") != "lelp"
                  else "targets command (generate_targets)")
        tensors = shards.read(self.settings["format"], self.directory, files, self.settings["dtype"], checksums,
                              hint=f"; rerun the {writer} with the same arguments to rewrite it")
        self._verified.add(s)
        n = entry["rows"][1] - entry["rows"][0]
        for name, t in tensors.items():
            if t.shape[0] != n:
                raise ValueError(f"shard {entry['index']} of {self.directory} field {name} has {t.shape[0]} rows, "
                                 f"the manifest says {n}: the file is truncated or corrupt")
        self._cache[s] = tensors
        return tensors

    def targets(self, indices: Sequence[int]) -> torch.Tensor:
        """Log-targets of the given rows (len(indices) x K): one gather per shard the rows fall in."""
        return self._gather(_row_index(indices, self.n_rows))

    def read_into_memory(self, max_bytes: int = IN_MEMORY_BYTES) -> bool:
        """Reads every row's log-targets into one tensor (each shard checked against its checksum as
        it is read) when they take at most ``max_bytes``; a batch is then one index of that tensor,
        as in a hand-written loop over in-memory targets, not a gather from each mapped shard it
        touches (in a training step, with the caches full of the model, ~0.3 ms a batch of 256 rows
        over four shards). Returns whether it did."""
        if self._in_memory is None:
            row_bytes = self.settings["K"] * self._dtype().itemsize
            if self.n_rows * row_bytes > max_bytes:
                return False
            every_row = torch.arange(self.n_rows)
            self._in_memory = self._gather(every_row)
            if self.check_labels:  # int16 (2 bytes a row) where they fit, as stored; -100 where none are
                labels = self._gather_labels(every_row)
                labels = torch.full((self.n_rows,), IGNORE_INDEX) if labels is None else labels
                self._labels_in_memory = shards.row_labels(labels)
        return True

    def _holds_log_targets(self) -> bool:
        """Whether the shards hold the log-targets as served (else they are computed on read)."""
        return self.settings.get("kind", "lelp") == "lelp" and not self.settings["compact"]

    def _dtype(self) -> torch.dtype:
        """The dtype of the log-targets served: the stored one, or fp32 for those computed on read."""
        return shards.DTYPES[self.settings["dtype"]] if self._holds_log_targets() else torch.float32

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """:meth:`targets` of checked row numbers, grouped by shard in NumPy, whose calls on a few
        hundred rows cost microseconds where torch ops cost tens (256 rows over four shards: ~90 us,
        ~140 us with torch ops); stored log-targets are copied out of each mapped shard as NumPy takes."""
        if self._in_memory is not None:
            return self._in_memory[idx]
        stored, dtype = self._holds_log_targets(), self._dtype()
        out = torch.empty(idx.numel(), self.settings["K"], dtype=dtype)
        if idx.numel() == 0:
            return out
        for s, rows, local in self._by_shard(idx.numpy()):
            tensors = self._shard(s)
            if stored and tensors["log_targets"].dtype == dtype:
                _bits(out)[rows] = _bits(tensors["log_targets"])[local]
            else:
                rows = rows if isinstance(rows, slice) else torch.from_numpy(rows)
                out[rows] = self._log_targets(tensors, torch.from_numpy(local)).to(dtype)
        return out

    def _gather_labels(self, idx: torch.Tensor) -> Optional[torch.Tensor]:
        """The source's label of each row as stored beside its targets (-100 where its shard holds
        none: targets written before session 65, or from a source without labels); None when no
        shard of the rows holds labels."""
        if self._labels_in_memory is not None:
            return self._labels_in_memory[idx]
        if idx.numel() == 0:
            return None
        out, found = torch.full((idx.numel(),), IGNORE_INDEX, dtype=torch.int64), False
        for s, rows, local in self._by_shard(idx.numpy()):
            labels = self._shard(s).get(shards.LABELS)
            if labels is not None:
                found = True
                at = rows if isinstance(rows, slice) else torch.from_numpy(rows)
                out[at] = labels[torch.from_numpy(local)].long()
        return out if found else None

    def _by_shard(self, idx: np.ndarray) -> Iterator[tuple]:
        """(shard, positions in ``idx``, rows within the shard) for each shard ``idx`` touches;
        positions are a slice when every row is in one shard."""
        shard_of = np.searchsorted(self._starts_array, idx, side="right") - 1
        first, last = int(shard_of.min()), int(shard_of.max())
        if first == last:
            yield first, slice(None), idx - self._starts[first]
            return
        order = np.argsort(shard_of, kind="stable")
        bounds = np.cumsum(np.bincount(shard_of - first))
        for s, (start, end) in enumerate(zip(np.concatenate(([0], bounds[:-1])), bounds), start=first):
            if end > start:
                rows = order[start:end]
                yield s, rows, idx[rows] - self._starts[s]

    def require_temperatures(self) -> None:
        """Raises where reading targets needs a temperature this dataset was not given (the stored
        fields, ``to_hf_dataset``, need none; training calls this before its first step)."""
        missing = _missing_temperatures(self.settings, self.beta, self.tau)
        if missing:
            raise ValueError(missing)

    def _log_targets(self, tensors: dict, local: torch.Tensor) -> torch.Tensor:
        """One shard's rows as log-targets, from whatever the store holds."""
        self.require_temperatures()
        kind = self.settings.get("kind", "lelp")
        if kind == "teacher_logits":  # vanilla KD targets at the τ chosen now
            return torch.log_softmax(tensors["teacher_logits"][local].float() / self.tau, dim=-1)
        if kind == "teacher_topk":
            return dense_topk_log_targets(tensors["topk_log_probs"][local], tensors["topk_indices"][local],
                                          self.settings["K"])
        if self.settings["compact"]:
            u, z = tensors["u"][local].float(), tensors["teacher_logits"][local].float()
            return reference.log_targets(u, z, self.settings["n_subclasses"], self.beta, self.tau).float()
        return tensors["log_targets"][local]

    def batch(self, indices: Sequence[int]) -> Any:
        """``log_t`` (B, K) of the rows, or ``(inputs, log_t)`` with the joined dataset's rows gathered
        as one batch (:func:`gather_rows`)."""
        return self.sampled_batch(_row_index(indices, self.n_rows))

    def sampled_batch(self, idx: torch.Tensor) -> Any:
        """:meth:`batch` of rows known to be valid (an int64 CPU tensor of row numbers in range, as a
        sampler draws them): no check of the row numbers, which in a training step costs more than
        the gather; the joined rows' labels are checked (``check_labels``: about 20 us more a batch
        of 256 held in memory, 64 -> 85 us median on one core of the 2-core CI machine)."""
        t = self._gather(idx)
        if self.dataset is None:
            return t
        inputs = gather_rows(self.dataset, idx)
        if self.check_labels:
            require_same_rows(batch_labels(inputs), self._gather_labels(idx), idx, self._stores)
        return inputs, t

    def to_hf_dataset(self):
        """The stored fields as a ``datasets.Dataset``, one row per target row (``log_targets``, or
        ``u`` and ``teacher_logits`` when compact), viewing the mapped shards without a copy (each
        shard checked as it is read, as for training). Join it to a tokenised dataset with
        ``datasets.concatenate_datasets([tokenised, targets], axis=1)``."""
        from ..io.arrow import hf_dataset, table

        order = shards.fields(self.settings["compact"], self.settings.get("kind", "lelp"))  # the written order
        tables = []
        for s in range(len(self.shards)):
            tensors = {k: v for k, v in self._shard(s).items() if k != shards.LABELS}  # the dataset's own column
            names = sorted(tensors, key=lambda n: (order.index(n) if n in order else len(order), n))
            tables.append(table({name: _numpy(tensors[name]) for name in names}))
        return hf_dataset(tables)

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: List[int]) -> List[Any]:
        # A DataLoader with automatic batching wants a list of rows; batch_loader avoids building it.
        idx = _row_index(indices, self.n_rows)
        t = self._gather(idx)
        if self.dataset is None:
            return list(t)
        items = [self.dataset[i] for i in indices]
        if self.check_labels:
            require_same_rows(item_labels(items), self._gather_labels(idx), idx, self._stores)
        return [(item, t[j]) for j, item in enumerate(items)]


def _bits(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of ``t``'s bytes as integers of its element size (bfloat16 has no NumPy dtype;
    a gather moves bits, so any dtype of the same size does)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()


def _numpy(t: torch.Tensor):
    """A shard field for Arrow: the mapped array itself, bfloat16 widened to float32 (Arrow has none)."""
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _check_temperatures(settings: dict, beta, tau) -> None:
    """The temperatures given, against what the store holds; one that reading targets needs but was not
    given is ``_missing_temperatures``' (the stored fields, e.g. ``to_hf_dataset``, need none)."""
    kind, compact = settings.get("kind", "lelp"), settings["compact"]
    if kind == "teacher_logits" and beta is not None:
        raise ValueError("these are stored teacher logits: they take tau (the KD temperature), not beta")
    elif kind == "teacher_topk" and (beta is not None or tau is not None):
        raise ValueError(f"these top-k log-probabilities were stored at tau={settings['tau']}; pass neither beta "
                         "nor tau")
    elif compact and (beta is None) != (tau is None):
        raise ValueError("these targets are stored compact (u and teacher logits): pass beta and tau")
    elif kind == "lelp" and not compact and (beta is not None or tau is not None):
        raise ValueError(f"these targets were written at beta={settings['beta']}, tau={settings['tau']}; "
                         "regenerate them with --compact to choose beta and tau at training time")
    for name, value in (("beta", beta), ("tau", tau)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _missing_temperatures(settings: dict, beta, tau) -> Optional[str]:
    """Why targets cannot be read from the store without more temperatures, or None."""
    if settings.get("kind", "lelp") == "teacher_logits" and tau is None:
        return "these are stored teacher logits: pass tau (the KD temperature) to read targets from them"
    if settings["compact"] and (beta is None or tau is None):
        return "these targets are stored compact (u and teacher logits): pass beta and tau to read targets from them"
    return None


def _row_index(indices, n_rows: int) -> torch.Tensor:
    """Row numbers as an int64 tensor, negative ones counted from the end; out of range is an error.
    The checks run in NumPy on the tensor's memory: per batch they cost microseconds, not torch ops."""
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
    rows = idx.numpy()
    if not rows.size:
        return idx
    low, high = rows.min(), rows.max()
    if low < -n_rows or high >= n_rows:
        raise IndexError(f"row index out of range for {n_rows} rows")
    return torch.where(idx < 0, idx + n_rows, idx) if low < 0 else idx


IGNORE_INDEX = -100  # a row without a label, as capture and the loss take it


def require_same_rows(labels: Optional[torch.Tensor], stored: Optional[torch.Tensor], idx: torch.Tensor,
                      where: str) -> None:
    """Refuses joined rows whose ``labels`` (:func:`batch_labels` of a collated batch,
    :func:`item_labels` of a list of items) differ from those ``where`` (the targets in DIR, the
    capture DIR) stores for the same row numbers: they are not the rows it was made from, in that
    order (a shuffled or filtered copy pairs every row with another row's targets: a walkthrough's
    student fell below chance, silently). Rows where either side has a negative label (-100,
    GLUE's -1: no label) are not compared."""
    if labels is None or stored is None or labels.shape != stored.shape:
        return
    # in NumPy on the tensors' memory: per batch of 256, ~1 us an operation where a torch op costs ~5
    lab, sto = labels.numpy(), stored.numpy()
    differ = (lab != sto) & (lab >= 0) & (sto >= 0)
    if differ.any():
        j = int(differ.argmax())
        raise ValueError(f"row {int(idx[j])} of the training data has label {int(labels[j])}, but {where} were made "
                         f"from a row labelled {int(stored[j])}: the data must be the rows they were made from, in the "
                         "same order (not shuffled, filtered or re-split); if its labels differ on purpose (noisy or "
                         "relabelled rows), pass check_labels=False")


def batch_labels(batch) -> Optional[torch.Tensor]:
    """The labels of a collated batch of (inputs, labels, ...) or of dicts with "labels"/"label":
    integer, one per row, on the CPU (a GPU's would cost a sync: not checked); else None."""
    if isinstance(batch, dict):
        y = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        y = batch[1]
    else:
        return None
    if not torch.is_tensor(y) or y.ndim != 1 or y.device.type != "cpu" or y.is_floating_point() \
            or y.is_complex() or y.dtype == torch.bool:
        return None
    return y.detach()


def item_labels(items: List[Any]) -> Optional[torch.Tensor]:
    """:func:`batch_labels` of single items (each label a Python or 0-d tensor integer)."""
    labels = [it.get("labels", it.get("label")) if isinstance(it, dict)
              else it[1] if isinstance(it, (tuple, list)) and len(it) >= 2 else None for it in items]
    if not labels or not all(isinstance(y, numbers.Integral) and not isinstance(y, bool)
                             or torch.is_tensor(y) and y.ndim == 0 for y in labels):
        return None
    return batch_labels((None, torch.stack([torch.as_tensor(y) for y in labels])))


def gather_rows(dataset, idx: torch.Tensor) -> Any:
    """The rows ``idx`` of ``dataset`` as one batch: tensors (and ``TensorDataset``) are indexed once;
    any other dataset gives its rows (``__getitems__`` when it has one) to ``default_collate``."""
    if torch.is_tensor(dataset):
        return dataset[idx.to(dataset.device)]
    if isinstance(dataset, TensorDataset):
        return tuple(t[idx.to(t.device)] for t in dataset.tensors)
    rows = idx.tolist()
    items = dataset.__getitems__(rows) if hasattr(dataset, "__getitems__") else [dataset[i] for i in rows]
    return default_collate(items)


class _Batches(Dataset):
    """``dataset.batch(rows)`` as the item of a DataLoader whose sampler yields batches of rows
    (int64 tensors: a ``batch`` method takes any sequence of row numbers, a tensor included)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices):
        return self.dataset.batch(indices)


class _IndexBatches(Sampler):
    """Row numbers in batches, as int64 tensors: the batches ``BatchSampler(RandomSampler(rows,
    generator=generator), batch_size, drop_last)`` gives (a ``randperm`` from the same generator, or
    from a seed drawn from the global RNG without one), without a Python int per row; the
    generator is left as RandomSampler leaves it, so reusing it gives the same later epochs."""

    def __init__(self, n_rows: int, batch_size: int, shuffle: bool, generator: Optional[torch.Generator],
                 drop_last: bool):
        batch_size = check_count("batch_size", batch_size)
        self.n_rows, self.batch_size, self.shuffle = n_rows, batch_size, shuffle
        self.generator, self.drop_last = generator, drop_last

    def __len__(self) -> int:
        full, rest = divmod(self.n_rows, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            generator = self.generator
            if generator is None:  # as RandomSampler: a seed from the global RNG
                generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
            rows = torch.randperm(self.n_rows, generator=generator)
        else:
            rows = torch.arange(self.n_rows)
        for batch in rows.split(self.batch_size)[:len(self)]:
            yield batch
        if self.shuffle and self.generator is not None:
            # RandomSampler draws a second permutation when it runs out (and keeps none of it):
            # the same draw here leaves a reused generator where a DataLoader would.
            torch.randperm(self.n_rows, generator=self.generator)


def batch_loader(dataset, batch_size: int, *, shuffle: bool = False, generator: Optional[torch.Generator] = None,
                 drop_last: bool = False, **loader_kwargs) -> DataLoader:
    """A DataLoader of ``dataset.batch(rows)`` (a :class:`TargetsDataset`, or any dataset with
    ``batch``): the same rows in the same order as ``DataLoader(dataset, batch_size, shuffle=shuffle,
    generator=generator)``, each batch gathered at once instead of row by row and collated."""
    sampler = _IndexBatches(len(dataset), batch_size, shuffle, generator, drop_last)
    # The loader draws its workers' base seed from ``generator`` before the sampler draws the
    # permutation, as DataLoader(shuffle=True, generator=...) does: same rows, same global RNG use.
    return DataLoader(_Batches(dataset), batch_size=None, sampler=sampler, generator=generator, **loader_kwargs)


class GatheredBatches:
    """The batches of :func:`batch_loader`, drawn in this process without a ``DataLoader`` (whose
    per-batch machinery costs ~50 us, a few per cent of a small step): same rows, same order, same
    use of ``generator`` and the global RNG. ``distill`` trains from it."""

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = False,
                 generator: Optional[torch.Generator] = None, drop_last: bool = False):
        self.dataset = dataset
        self.sampler = _IndexBatches(len(dataset), batch_size, shuffle, generator, drop_last)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        # A DataLoader draws its workers' base seed before the sampler's permutation; the same draw
        # here keeps the random streams, and so a resumed run's batches, as they were.
        torch.empty((), dtype=torch.int64).random_(generator=self.sampler.generator)
        take = getattr(self.dataset, "sampled_batch", self.dataset.batch)  # the sampler's rows are valid
        for rows in self.sampler:
            yield take(rows)


def collate_with_targets(batch: List[Any]):
    """DataLoader collate for ``TargetsDataset(dir, dataset)``: ``(collated items, (B, K) log-targets)``."""
    if batch and isinstance(batch[0], tuple) and len(batch[0]) == 2 and torch.is_tensor(batch[0][1]):
        items, targets = zip(*batch)
        return default_collate(list(items)), torch.stack(targets)
    return torch.stack(batch)
