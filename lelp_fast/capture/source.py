"""A capture directory read back as an embedding source (for ``fit`` and ``generate_targets``)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Optional, Tuple

import numpy as np
import torch

from ..io import checksum, mapped
from ..io.sources import DEFAULT_CHUNK_BYTES, Chunk, EmbeddingSource, register_directory_source, wanted
from ..offline import manifest as mf
from .runner import HEAD_FILE, KIND

REPAIR_HINT = "; rerun the capture (it rewrites damaged files) or remove the directory"


class CaptureSource(EmbeddingSource):
    """The rows of a finished capture, one chunk per shard (``chunk_bytes`` is not used: the
    shards are the unit). Every shard's size is checked when the source is opened, and its checksum
    (XXH3-128, :mod:`lelp_fast.io.checksum`) the first time it is read for use (the hash runs over
    the bytes being read, so it costs no second pass); a truncated or altered shard is an error
    naming the file. ``verify=False`` skips the hash. The chunks' tensors are read-only views of
    the memory-mapped shards, with or without the check: clone one before changing it in place."""

    def __init__(self, directory: str, *, verify: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"capture directory {self.directory} does not exist")
        manifest = mf.read_manifest(self.directory, KIND)
        if manifest is None:
            raise ValueError(f"{self.directory} has no {mf.MANIFEST}: the capture did not finish; rerun it")
        for entry in manifest["shards"]:
            mf.verify_shard(self.directory, entry, checksums=False)  # sizes now, checksums when read
        self._head = manifest.get("head")  # the head file's record (captures before session 59: none)
        if self._head is not None and not os.path.exists(os.path.join(self.directory, self._head["file"])):
            raise FileNotFoundError(mf.file_problem(self.directory, self._head, checksums=False) + REPAIR_HINT)
        self.verify, self._verified = verify, set()
        self.shards = manifest["shards"]
        self.n_rows = manifest["n_rows"]
        self.embeddings_dtype = manifest["settings"].get("dtype")
        self._starts = torch.tensor([e["rows"][0] for e in self.shards], dtype=torch.int64)
        with open(os.path.join(self.directory, mf.MANIFEST), "rb") as f:
            self._fingerprint = hashlib.sha256(f.read()).hexdigest()[:16]
        # The widths from the first shard's header (a mapping, no hash): its checksum is checked where
        # it is read for use, in the reader's thread, like every other shard's.
        first = mapped.safetensors_arrays(self._path(0)) if self.shards else None
        self.dim = None if first is None else first["embeddings"].shape[1]
        self.num_classes = None if first is None else first["teacher_logits"].shape[1]

    def _path(self, s: int) -> str:
        return os.path.join(self.directory, self.shards[s]["files"]["capture"]["file"])

    def _read(self, s: int) -> dict:
        """Shard ``s``'s tensors as views of its mapping; the first read with ``verify`` hashes that
        mapping (no second pass, no copy)."""
        info = self.shards[s]["files"]["capture"] if self.verify and s not in self._verified else None
        arrays = mapped.safetensors_arrays(self._path(s), info, REPAIR_HINT)
        self._verified.add(s)
        with warnings.catch_warnings():  # a read-only map: the tensors are only ever read
            warnings.simplefilter("ignore", UserWarning)
            tensors = {name: torch.from_numpy(a) for name, a in arrays.items()}
        if self.embeddings_dtype == "bfloat16":
            tensors["embeddings"] = tensors["embeddings"].view(torch.bfloat16)
        return tensors

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, skip=0, rank=0, world=1, every=1):
        for i, entry in enumerate(self.shards):
            if wanted(i, skip, rank, world, every):
                t = self._read(i)
                yield Chunk(i, entry["rows"][0], t["embeddings"], t["labels"], t["teacher_logits"])

    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def nbytes(self) -> Optional[int]:
        return None

    def max_label(self) -> Optional[int]:
        top = None
        for i in range(len(self.shards)):
            labels = self._read(i)["labels"]
            if labels.numel() and int(labels.max()) >= 0:  # a shard of -100 rows alone has no class
                top = int(labels.max()) if top is None else max(top, int(labels.max()))
        return top

    def head(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The teacher head ``(W (C x d), b (C,))`` when the capture stored one."""
        path = os.path.join(self.directory, HEAD_FILE)
        if not os.path.exists(path):
            return None
        from safetensors.torch import load

        with open(path, "rb") as f:
            blob = f.read()
        if self.verify:  # the bytes read are the bytes used: one read, hashed (a few KB)
            checksum.check(blob, self._head, path, REPAIR_HINT)
        t = load(blob)
        return t["weight"], t["bias"]

    def rows(self, indices) -> dict:
        """embeddings, teacher_logits, labels of the given rows (any order), read shard by shard."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_rows):
            raise IndexError(f"row index out of range for {self.n_rows} rows")
        shard_of = torch.searchsorted(self._starts, idx, right=True) - 1
        out = {}
        for s in torch.unique(shard_of).tolist():
            where = torch.nonzero(shard_of == s).flatten()
            part = self._cached(s)
            local = idx[where] - int(self._starts[s])
            for key, t in part.items():
                if key not in out:
                    out[key] = t.new_empty((idx.numel(), *t.shape[1:]))
                out[key][where] = t[local]
        return out

    def _cached(self, s: int) -> dict:
        cache = self.__dict__.setdefault("_cache", {})
        if s not in cache:
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[s] = self._read(s)
        return cache[s]

    def __getstate__(self) -> dict:  # DataLoader workers: the paths, not the loaded shards
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def to_hf_dataset(self, verify: bool = True):
        """The capture as a ``datasets.Dataset`` (``embeddings``, ``teacher_logits``, ``labels`` per row),
        viewing the memory-mapped shards without a copy; with ``verify`` each shard's checksum is checked
        on the same mapping as it is opened (bfloat16 embeddings are widened to float32: Arrow has none)."""
        from ..io.arrow import hf_dataset, table

        tables = []
        for s, entry in enumerate(self.shards):
            arrays = mapped.safetensors_arrays(self._path(s), entry["files"]["capture"] if verify else None,
                                               "; rerun the capture with the same arguments to rewrite it")
            if self.embeddings_dtype == "bfloat16":  # mapped as its uint16 bits
                arrays["embeddings"] = torch.from_numpy(arrays["embeddings"].view(np.int16).copy()).view(
                    torch.bfloat16).float().numpy()
            tables.append(table({k: arrays[k] for k in ("embeddings", "teacher_logits", "labels")}))
        return hf_dataset(tables)

    def tensors(self) -> dict:
        """Every row at once (small captures, evaluation sets): embeddings, teacher_logits, labels."""
        parts = [self._read(i) for i in range(len(self.shards))]
        return {k: torch.cat([p[k] for p in parts]) for k in ("embeddings", "teacher_logits", "labels")}


class CaptureDataset(torch.utils.data.Dataset):
    """``(dataset[i], (embedding_i, teacher_logits_i))``: training inputs joined by row index to the
    teacher outputs a capture stored for them (for the online loss: targets computed in the loss)."""

    def __init__(self, directory: str, dataset, *, check_labels: bool = True):
        self.source, self.dataset, self.check_labels = CaptureSource(directory), dataset, bool(check_labels)
        if len(dataset) != self.source.n_rows:
            raise ValueError(f"dataset has {len(dataset)} rows but the capture {directory} has {self.source.n_rows}")

    def __len__(self) -> int:
        return self.source.n_rows

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def batch(self, indices):
        """``(inputs, (embeddings, teacher_logits))`` of the rows, each gathered as one batch; the
        inputs' labels checked against the captured ones (``TargetsDataset``'s ``check_labels``)."""
        from ..offline.dataset import batch_labels, gather_rows

        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        rows = self.source.rows(idx)
        inputs = gather_rows(self.dataset, idx)
        self._check(batch_labels(inputs), rows, idx)
        return inputs, (rows["embeddings"], rows["teacher_logits"])

    def __getitems__(self, indices):
        from ..offline.dataset import item_labels

        rows = self.source.rows(indices)
        items = [self.dataset[i] for i in indices]
        self._check(item_labels(items), rows, torch.as_tensor(indices, dtype=torch.int64))
        return [(item, (rows["embeddings"][j], rows["teacher_logits"][j])) for j, item in enumerate(items)]

    def _check(self, labels, rows: dict, idx: torch.Tensor) -> None:
        from ..offline.dataset import require_same_rows

        if self.check_labels:
            require_same_rows(labels, rows["labels"], idx, f"the capture {self.source.directory}")


def _is_capture(path: str) -> bool:
    """A directory written by ``capture`` (finished or not: an unfinished one is refused by name)."""
    manifest = os.path.join(path, mf.MANIFEST)
    if not os.path.exists(manifest):
        return any(name.startswith("shard-") or name.startswith("progress-rank") for name in os.listdir(path))
    try:
        with open(manifest) as f:
            return json.load(f).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


register_directory_source(_is_capture, CaptureSource)
