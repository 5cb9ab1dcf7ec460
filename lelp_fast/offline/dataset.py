"""Training from stored targets: a memory-mapped dataset joined to the training data by row index."""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence

import torch
from torch.utils.data import Dataset, default_collate

from .. import reference
from . import manifest as mf
from . import shards


class TargetsDataset(Dataset):
    """Row ``i`` of the stored targets, optionally joined to row ``i`` of another dataset.

    ``TargetsDataset(dir)[i]`` is the (K,) log-target row (in the stored dtype; the fused loss
    reads fp16/bf16 directly). ``TargetsDataset(dir, dataset)[i]`` is ``(dataset[i], log_t_i)``.
    Compact outputs (``u`` and teacher logits) are turned into log-targets at the ``beta`` and
    ``tau`` given here (fp32). Batches are read shard by shard (``__getitems__``, which the
    DataLoader uses), and ``.npy`` shards are memory-mapped, so memory stays at the batch size.

    Args:
        directory: a finished ``generate_targets`` / ``lelp-fast targets`` output directory.
        dataset: optional map-style dataset with exactly the same number of rows.
        beta, tau: temperatures for compact outputs (required there; refused otherwise).
        verify: also check every shard's sha256 (reads all the outputs once); sizes are always checked.
    """

    def __init__(self, directory: str, dataset: Optional[Sequence] = None, *, beta: Optional[float] = None,
                 tau: Optional[float] = None, verify: bool = False):
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
        compact = self.settings["compact"]
        if compact and (beta is None or tau is None):
            raise ValueError("these targets are stored compact (u and teacher logits): pass beta and tau")
        if not compact and (beta is not None or tau is not None):
            raise ValueError(f"these targets were written at beta={self.settings['beta']}, tau={self.settings['tau']}; "
                             "regenerate them with --compact to choose beta and tau at training time")
        for name, value in (("beta", beta), ("tau", tau)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for entry in self.shards:  # sizes always (a stat per file), sha256 with verify=True
            mf.verify_shard(self.directory, entry, checksums=verify)
        self.dataset, self.beta, self.tau = dataset, beta, tau
        self._starts = [e["rows"][0] for e in self.shards]
        self._starts_tensor = torch.tensor(self._starts, dtype=torch.int64)
        self._cache: dict = {}

    def __len__(self) -> int:
        return self.n_rows

    def __getstate__(self) -> dict:
        # DataLoader workers get the dataset pickled: send the paths, not the mapped shards.
        return {**self.__dict__, "_cache": {}}

    def _shard(self, s: int) -> dict:
        if s not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            entry = self.shards[s]
            files = {k: v["file"] for k, v in entry["files"].items()}
            tensors = shards.read(self.settings["format"], self.directory, files, self.settings["dtype"])
            n = entry["rows"][1] - entry["rows"][0]
            for name, t in tensors.items():
                if t.shape[0] != n:
                    raise ValueError(f"shard {entry['index']} of {self.directory} field {name} has {t.shape[0]} rows, "
                                     f"the manifest says {n}: the file is truncated or corrupt")
            self._cache[s] = tensors
        return self._cache[s]

    def targets(self, indices: Sequence[int]) -> torch.Tensor:
        """Log-targets of the given rows (len(indices) x K), read shard by shard."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < -self.n_rows or int(idx.max()) >= self.n_rows):
            raise IndexError(f"row index out of range for {self.n_rows} rows")
        idx = torch.where(idx < 0, idx + self.n_rows, idx)
        k = self.settings["K"]
        dtype = torch.float32 if self.settings["compact"] else shards.DTYPES[self.settings["dtype"]]
        out = torch.empty(idx.numel(), k, dtype=dtype)
        shard_of = torch.searchsorted(self._starts_tensor, idx, right=True) - 1
        for s in torch.unique(shard_of).tolist():
            where = torch.nonzero(shard_of == s).flatten()
            local = (idx[where] - self._starts[s]).numpy()
            tensors = self._shard(s)
            if self.settings["compact"]:
                u = tensors["u"][local].float()
                z = tensors["teacher_logits"][local].float()
                out[where] = reference.log_targets(u, z, self.settings["n_subclasses"], self.beta, self.tau).float()
            else:
                out[where] = tensors["log_targets"][local]
        return out

    def __getitem__(self, i: int) -> Any:
        t = self.targets([i])[0]
        return t if self.dataset is None else (self.dataset[i], t)

    def __getitems__(self, indices: List[int]) -> List[Any]:
        t = self.targets(indices)
        if self.dataset is None:
            return list(t)
        return [(self.dataset[i], t[j]) for j, i in enumerate(indices)]


def collate_with_targets(batch: List[Any]):
    """DataLoader collate for ``TargetsDataset(dir, dataset)``: ``(collated items, (B, K) log-targets)``."""
    if batch and isinstance(batch[0], tuple) and len(batch[0]) == 2 and torch.is_tensor(batch[0][1]):
        items, targets = zip(*batch)
        return default_collate(list(items)), torch.stack(targets)
    return torch.stack(batch)
