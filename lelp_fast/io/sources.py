"""Where embeddings come from: one interface over arrays, files and iterables of chunks.

A source yields :class:`Chunk` objects of at most ``chunk_bytes`` of embeddings, in a fixed order,
each tagged with its index so that a fit can be sharded across ranks (chunk ``i`` goes to rank
``i % world``) and resumed (skip the chunks already counted).

Supported: numpy arrays (memory-mapped too), torch tensors, ``.npy`` files (fp32/fp16; a uint16
``.npy`` read as bf16 with ``bf16=True``), safetensors files (any float dtype, bf16 included),
Parquet files (pyarrow; a list/fixed-size-list column of floats), and any iterable of
``(embeddings, labels[, teacher_logits])`` tuples (a teacher forward loop).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import xxhash

from .._checks import as_tensor

DEFAULT_CHUNK_BYTES = 64 << 20


@dataclass
class Chunk:
    """One block of rows: embeddings (n x d), labels (n,) or None, teacher logits (n x C) or None."""

    index: int
    start_row: int
    embeddings: torch.Tensor
    labels: Optional[torch.Tensor]
    teacher_logits: Optional[torch.Tensor]


class EmbeddingSource:
    """Base class: ``chunks()`` yields :class:`Chunk` in a fixed order."""

    #: total rows, or None when unknown (plain iterables)
    n_rows: Optional[int] = None
    #: embedding dimension, or None until the first chunk is seen
    dim: Optional[int] = None
    #: False for one-shot iterables: extra fit passes and resume need to read again
    rereadable: bool = True

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, skip: int = 0, rank: int = 0,
               world: int = 1, every: int = 1) -> Iterator[Chunk]:
        """Chunks ``i >= skip`` with ``i % every == 0`` (a strided sample; 1: all) whose turn
        ``i // every`` falls to this rank (``% world == rank``)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short string that changes when the data changes (used to refuse a stale resume)."""
        return ""

    @property
    def nbytes(self) -> Optional[int]:
        """Bytes of embeddings, when known."""
        return None

    def max_label(self) -> Optional[int]:
        """The largest label, when labels can be read without the embeddings (to infer C)."""
        return None

    def head(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The teacher head ``(W, b)`` stored with the rows, when the source has one (a capture)."""
        return None


# Directory formats defined by the layers above io (lelp_fast.capture registers its capture
# directories), so that io can open them without importing those layers.
_DIRECTORY_SOURCES: List[Tuple[Callable[[str], bool], Callable[[str], EmbeddingSource]]] = []


def register_directory_source(recognises: Callable[[str], bool], opens: Callable[[str], EmbeddingSource]) -> None:
    """``as_source(path)`` opens a directory with ``opens`` when ``recognises(path)``."""
    _DIRECTORY_SOURCES.append((recognises, opens))


def wanted(i: int, skip: int, rank: int, world: int, every: int) -> bool:
    """Whether chunk ``i`` is read (see :meth:`EmbeddingSource.chunks`)."""
    return i >= skip and i % every == 0 and (i // every) % world == rank


def _rows_per_chunk(dim: int, itemsize: int, chunk_bytes: int) -> int:
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return max(1, chunk_bytes // max(1, dim * itemsize))


def check_numeric(what: str, arr) -> None:
    """Refuses a numpy array of strings or objects (a .npy of text), which torch cannot take."""
    dtype = getattr(arr, "dtype", None)
    if isinstance(dtype, np.dtype) and dtype.kind not in "biufc":
        raise ValueError(f"{what} holds {dtype} values, not numbers")


class ArraySource(EmbeddingSource):
    """Row-indexable arrays: numpy (memory-mapped too) or torch tensors, read slice by slice."""

    def __init__(self, embeddings, labels=None, teacher_logits=None, *, bf16: bool = False, name: str = ""):
        if getattr(embeddings, "ndim", None) != 2:
            raise ValueError(
                f"embeddings must be a 2-D (rows x features) array, got shape {tuple(getattr(embeddings, 'shape', ()))}"
            )
        n = embeddings.shape[0]
        for arg, arr in (("labels", labels), ("teacher_logits", teacher_logits)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"{arg} has {len(arr)} rows but embeddings has {n}")
        for arg, arr in (("embeddings", embeddings), ("labels", labels), ("teacher_logits", teacher_logits)):
            check_numeric(arg, arr)
        self.embeddings, self.labels, self.teacher_logits = embeddings, labels, teacher_logits
        self.bf16 = bf16
        self.n_rows = n
        self.dim = embeddings.shape[1]
        self.name = name

    @property
    def itemsize(self) -> int:
        if isinstance(self.embeddings, torch.Tensor):
            return self.embeddings.element_size()
        return self.embeddings.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.dim * self.itemsize

    def max_label(self) -> Optional[int]:
        if self.labels is None or len(self.labels) == 0:
            return None
        return int(self.labels.max())

    def _rows(self, arr, start, stop, name):
        if arr is None:
            return None
        block = arr[start:stop]
        if isinstance(block, np.ndarray):
            block = np.ascontiguousarray(block)  # reads the memory-mapped pages once
            if name == "embeddings" and self.bf16:
                if block.dtype != np.uint16:
                    raise ValueError(f"bf16=True needs a uint16 array of bf16 bits, got {block.dtype}")
                return torch.from_numpy(block).view(torch.bfloat16)
        return as_tensor(name, block)

    def chunks(self, chunk_bytes=DEFAULT_CHUNK_BYTES, *, skip=0, rank=0, world=1, every=1):
        rows = _rows_per_chunk(self.dim, self.itemsize, chunk_bytes)
        n_chunks = (self.n_rows + rows - 1) // rows
        for i in range(skip, n_chunks):
            if not wanted(i, skip, rank, world, every):
                continue
            start, stop = i * rows, min((i + 1) * rows, self.n_rows)
            yield Chunk(
                i,
                start,
                self._rows(self.embeddings, start, stop, "embeddings"),
                self._rows(self.labels, start, stop, "labels"),
                self._rows(self.teacher_logits, start, stop, "teacher_logits"),
            )

    def fingerprint(self) -> str:
        """Every byte of the arrays (read at memory speed, XXH3): an edit to any row is a changed source."""
        h = hashlib.sha256(self._sampled_fingerprint().encode())
        for arr in self._arrays().values():
            h.update(content_digest(arr))
        return h.hexdigest()[:16]

    def _sampled_fingerprint(self) -> str:
        """Names, shapes and a few rows: with a file's size and modification time (NpySource), enough
        to notice a replaced or rewritten file without reading gigabytes."""
        h = hashlib.sha256(f"{self.name}:{self.n_rows}x{self.dim}".encode())
        for r in _sampled_rows(self.n_rows):
            h.update(_row_bytes(self.embeddings[r : r + 1]))
        _hash_companions(h, {k: v for k, v in self._arrays().items() if k != "embeddings"}, self.n_rows)
        return h.hexdigest()[:16]

    def _arrays(self) -> dict:
        """The arrays given, logits that are the embeddings themselves (the KD store's) counted once."""
        companions = {"labels": self.labels, "teacher_logits": self.teacher_logits}
        return {"embeddings": self.embeddings,
                **{k: v for k, v in companions.items() if v is not None and v is not self.embeddings}}


def _sampled_rows(n_rows: int) -> List[int]:
    return [r for r in sorted({0, n_rows // 2, n_rows - 1}) if 0 <= r < n_rows]


def _hash_companions(h, arrays: dict, n_rows: int) -> None:
    """Adds the labels and teacher logits given with the embeddings to a fingerprint: each one's name,
    shape and sampled rows. (Nothing for those not given, nor for logits that are the embeddings
    themselves, as the KD store's are: a fingerprint made before session 58 of such a source holds.)"""
    for name, arr in arrays.items():
        if arr is None:
            continue
        h.update(f"{name}:{tuple(arr.shape)}".encode())
        for r in _sampled_rows(n_rows):
            h.update(_row_bytes(arr[r : r + 1]))


def _hash_in_full(h, arrays: dict) -> None:
    """Adds every byte of the labels and logits given in memory beside a file: no file's size or
    modification time tells an edit of them. (Nothing when none is given, so the fingerprint of a
    file source alone, or with companion files, is as before session 65.)"""
    for name, arr in arrays.items():
        if arr is not None:
            h.update(name.encode() + content_digest(arr))


def content_digest(arr, block_bytes: int = 64 << 20) -> bytes:
    """XXH3-128 of an array's bytes (a tensor on any device, bf16 too), block by block of rows."""
    digest = xxhash.xxh3_128()
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * _itemsize(arr))
    rows = max(1, block_bytes // row_bytes)
    for start in range(0, len(arr), rows):
        digest.update(_byte_view(arr[start : start + rows]))  # its buffer: no copy to bytes
    return digest.digest()


def _itemsize(arr) -> int:
    return arr.element_size() if isinstance(arr, torch.Tensor) else np.dtype(arr.dtype).itemsize


def _hash_files(h, paths) -> None:
    """Adds each file's path, size and modification time (a rewritten file between the sampled rows)."""
    for path in paths:
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())


def _default_names(names: dict, embeddings: str, labels: str, logits: Optional[str]) -> dict:
    """``names`` (what is read of a file, by what) as the defaults name them, absent ones left absent:
    a fingerprint adds the names only where they differ, so one made before session 58 still holds."""
    defaults = {"embeddings": embeddings, "labels": labels, "teacher_logits": logits}
    return {what: None if names[what] is None else defaults[what] for what in names}


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor of ``array``'s values that may be written: Arrow hands out read-only views of its
    buffers, which torch would share (and warn about) and a write would fault on."""
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def _row_bytes(rows) -> bytes:
    """The raw bytes of a few rows of an array or tensor."""
    return _byte_view(rows).tobytes()


def _byte_view(rows) -> np.ndarray:
    """Rows of an array or tensor as C-ordered uint8 (bf16 and CUDA tensors too: numpy has no bf16)."""
    if isinstance(rows, torch.Tensor):
        return rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(rows).reshape(-1).view(np.uint8)


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as exc:  # noqa: BLE001 - reported with the file's name
        raise ValueError(f"{what} file {path} is not a readable .npy file ({exc})") from exc
    header_and_data = arr.nbytes + getattr(arr, "offset", 0)
    if os.path.getsize(path) < header_and_data:
        raise ValueError(f"{what} file {path} is truncated: {os.path.getsize(path)} bytes, needs {header_and_data}")
    check_numeric(f"{what} file {path}", arr)
    return arr


class NpySource(ArraySource):
    """Memory-mapped ``.npy`` files; labels and logits may be ``.npy`` paths or arrays."""

    def __init__(self, path: str, labels=None, teacher_logits=None, *, bf16: bool = False):
        emb = _load_npy(path, "embeddings")
        given = {"labels": labels, "teacher_logits": teacher_logits}
        self.companion_files = [os.path.abspath(p) for p in given.values() if isinstance(p, (str, os.PathLike))]
        self.companions_in_memory = {k: v for k, v in given.items() if not isinstance(v, (str, os.PathLike))}
        if isinstance(labels, (str, os.PathLike)):
            labels = _load_npy(os.fspath(labels), "labels")
        if isinstance(teacher_logits, (str, os.PathLike)):
            teacher_logits = _load_npy(os.fspath(teacher_logits), "teacher_logits")
        super().__init__(emb, labels, teacher_logits, bf16=bf16, name=os.path.abspath(path))

    def chunks(self, chunk_bytes=DEFAULT_CHUNK_BYTES, *, skip=0, rank=0, world=1, every=1):
        """Maps each chunk's bytes on its own (copy-on-write, so the tensor is writable) and asks the
        kernel to read them ahead (``MADV_WILLNEED``). No copy: a read pass costs page mappings
        only, which matters on few cores. A chunk's pages count in this process's RSS only while
        the chunk is alive; its mapping goes when the last tensor over it does."""
        arr = self.embeddings
        if not arr.flags.c_contiguous:
            yield from super().chunks(chunk_bytes, skip=skip, rank=rank, world=world, every=every)
            return
        rows = _rows_per_chunk(self.dim, self.itemsize, chunk_bytes)
        row_bytes = self.dim * self.itemsize
        n_chunks = (self.n_rows + rows - 1) // rows
        with open(self.name, "rb", buffering=0) as f:
            for i in range(skip, n_chunks):
                if not wanted(i, skip, rank, world, every):
                    continue
                start, stop = i * rows, min((i + 1) * rows, self.n_rows)
                begin = arr.offset + start * row_bytes
                end = arr.offset + stop * row_bytes
                size = os.fstat(f.fileno()).st_size
                if size < end:  # mapping past the end would crash (SIGBUS) on first touch
                    last = max(start, (size - arr.offset) // row_bytes)
                    raise ValueError(f"embeddings file {self.name} ended early at row {last}")
                aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
                mapping = mmap.mmap(f.fileno(), end - aligned, flags=mmap.MAP_PRIVATE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
                if hasattr(mapping, "madvise"):
                    mapping.madvise(mmap.MADV_WILLNEED)
                block = np.frombuffer(mapping, dtype=arr.dtype, count=(stop - start) * self.dim,
                                      offset=begin - aligned).reshape(stop - start, self.dim)
                emb = torch.from_numpy(block)
                if self.bf16:
                    if block.dtype != np.uint16:
                        raise ValueError(f"bf16=True needs a uint16 array of bf16 bits, got {block.dtype}")
                    emb = emb.view(torch.bfloat16)
                yield Chunk(i, start, emb, self._rows(self.labels, start, stop, "labels"),
                            self._rows(self.teacher_logits, start, stop, "teacher_logits"))

    def fingerprint(self) -> str:
        st = os.stat(self.name)
        h = hashlib.sha256(f"{self._sampled_fingerprint()}:{st.st_size}:{st.st_mtime_ns}".encode())
        _hash_files(h, self.companion_files)
        _hash_in_full(h, self.companions_in_memory)
        return h.hexdigest()[:16]


class SafetensorsSource(EmbeddingSource):
    """A safetensors file holding ``embeddings`` (and optionally ``labels``, ``teacher_logits``)."""

    def __init__(self, path: str, *, embeddings_key: str = "embeddings", labels_key: str = "labels",
                 logits_key: str = "teacher_logits", labels=None, teacher_logits=None):
        from safetensors import safe_open

        if not os.path.exists(path):
            raise FileNotFoundError(f"embeddings file {path} does not exist")
        self.path = os.path.abspath(path)
        try:
            with safe_open(self.path, framework="pt") as f:
                keys = set(f.keys())
                if embeddings_key not in keys:
                    raise ValueError(f"{path} has no tensor {embeddings_key!r} (it has {sorted(keys)})")
                shape = f.get_slice(embeddings_key).get_shape()
                dtype = f.get_slice(embeddings_key).get_dtype()
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
        if len(shape) != 2:
            raise ValueError(f"{path}: {embeddings_key!r} must be 2-D, got shape {shape}")
        self.keys = {"embeddings": embeddings_key,
                     "labels": labels_key if labels is None and labels_key in keys else None,
                     "teacher_logits": logits_key if teacher_logits is None and logits_key in keys else None}
        self.external = {"labels": labels, "teacher_logits": teacher_logits}
        self.n_rows, self.dim = shape
        self.itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dtype, 4)

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.dim * self.itemsize

    def max_label(self) -> Optional[int]:
        from safetensors import safe_open

        if self.keys["labels"] is None:
            ext = self.external["labels"]
            return None if ext is None or len(ext) == 0 else int(ext.max())
        with safe_open(self.path, framework="pt") as f:
            labels = f.get_tensor(self.keys["labels"])
        return int(labels.max()) if labels.numel() else None

    def chunks(self, chunk_bytes=DEFAULT_CHUNK_BYTES, *, skip=0, rank=0, world=1, every=1):
        from safetensors import safe_open

        rows = _rows_per_chunk(self.dim, self.itemsize, chunk_bytes)
        n_chunks = (self.n_rows + rows - 1) // rows
        with safe_open(self.path, framework="pt") as f:
            for i in range(skip, n_chunks):
                if not wanted(i, skip, rank, world, every):
                    continue
                start, stop = i * rows, min((i + 1) * rows, self.n_rows)
                parts = {}
                for what in ("embeddings", "labels", "teacher_logits"):
                    key = self.keys.get(what)
                    ext = self.external.get(what)
                    if key is not None:
                        parts[what] = f.get_slice(key)[start:stop]
                    elif ext is not None:
                        parts[what] = as_tensor(what, ext[start:stop])
                    else:
                        parts[what] = None
                yield Chunk(i, start, parts["embeddings"], parts["labels"], parts["teacher_logits"])

    def fingerprint(self) -> str:
        st = os.stat(self.path)
        h = hashlib.sha256(f"{self.path}:{st.st_size}:{st.st_mtime_ns}".encode())
        if self.keys != _default_names(self.keys, "embeddings", "labels", "teacher_logits"):
            h.update(repr(sorted(self.keys.items())).encode())  # other tensors of the file are read
        _hash_companions(h, self.external, self.n_rows)
        _hash_in_full(h, self.external)
        return h.hexdigest()[:16]


class ParquetSource(EmbeddingSource):
    """A Parquet file (pyarrow) with an embeddings column of float lists, read in row batches."""

    def __init__(self, path: str, *, embeddings_column: str = "embeddings", labels_column: Optional[str] = "labels",
                 logits_column: Optional[str] = None):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - pyarrow is an optional extra
            raise ImportError("Parquet sources need pyarrow: pip install 'lelp_fast[io]'") from exc
        if not os.path.exists(path):
            raise FileNotFoundError(f"embeddings file {path} does not exist")
        self.path = os.path.abspath(path)
        try:
            meta = pq.ParquetFile(self.path)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{path} is not a readable Parquet file ({exc})") from exc
        names = meta.schema_arrow.names
        for what, col in (("embeddings_column", embeddings_column), ("labels_column", labels_column),
                          ("logits_column", logits_column)):
            if col is not None and col not in names and not (what == "labels_column" and col == "labels"):
                raise ValueError(f"{path} has no column {col!r} ({what}); columns: {names}")
        self.columns = {"embeddings": embeddings_column,
                        "labels": labels_column if labels_column in names else None,
                        "teacher_logits": logits_column}
        self.n_rows = meta.metadata.num_rows
        first = meta.read_row_group(0, columns=[embeddings_column]).column(0)
        self.dim = len(first[0]) if len(first) else 0
        value_type = first.type.value_type
        self.itemsize = max(1, value_type.bit_width // 8)

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.dim * self.itemsize

    def max_label(self) -> Optional[int]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if self.columns["labels"] is None:
            return None
        column = pq.read_table(self.path, columns=[self.columns["labels"]]).column(0)
        value = pc.max(column).as_py()
        return None if value is None else int(value)

    def _matrix(self, column, what: str, width: int, first_row: int) -> torch.Tensor:
        """(n, width) from a list column; every row's length is checked (15 and 17 values would
        otherwise be re-cut into two rows of 16)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        bad = np.nonzero(np.isnan(lengths.astype(np.float64)) | (lengths != width))[0]
        if bad.size:
            row = int(bad[0])
            got = "null" if col[row].as_py() is None else f"{int(lengths[row])} values"
            raise ValueError(f"{self.path}: column {self.columns[what]!r} row {first_row + row} has {got}, "
                             f"expected {width}")
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return _tensor(flat.reshape(len(col), width))

    def _labels(self, column, first_row: int) -> torch.Tensor:
        """Labels as stored: nulls named here, float labels refused by the fit's one label rule."""
        if column.null_count:
            row = int(np.nonzero(column.is_null().to_numpy(zero_copy_only=False))[0][0])
            raise ValueError(f"{self.path}: column {self.columns['labels']!r} row {first_row + row} is null")
        return _tensor(column.to_numpy(zero_copy_only=False))

    def chunks(self, chunk_bytes=DEFAULT_CHUNK_BYTES, *, skip=0, rank=0, world=1, every=1):
        import pyarrow.parquet as pq

        rows = _rows_per_chunk(self.dim, self.itemsize, chunk_bytes)
        cols = [c for c in self.columns.values() if c is not None]
        pf = pq.ParquetFile(self.path)
        start = 0
        for i, batch in enumerate(pf.iter_batches(batch_size=rows, columns=cols)):
            n = batch.num_rows
            if wanted(i, skip, rank, world, every):
                emb = self._matrix(batch.column(self.columns["embeddings"]), "embeddings", self.dim, start)
                labels = logits = None
                if self.columns["labels"] is not None:
                    labels = self._labels(batch.column(self.columns["labels"]), start)
                if self.columns["teacher_logits"] is not None:
                    logits_col = batch.column(self.columns["teacher_logits"])
                    width = len(logits_col[0]) if n and logits_col[0].is_valid else 0
                    logits = self._matrix(logits_col, "teacher_logits", width, start)
                yield Chunk(i, start, emb, labels, logits)
            start += n

    def fingerprint(self) -> str:
        st = os.stat(self.path)
        h = hashlib.sha256(f"{self.path}:{st.st_size}:{st.st_mtime_ns}".encode())
        if self.columns != _default_names(self.columns, "embeddings", "labels", None):
            h.update(repr(sorted(self.columns.items())).encode())  # other columns of the file are read
        return h.hexdigest()[:16]


class IterableSource(EmbeddingSource):
    """Any iterable of ``(embeddings, labels[, teacher_logits])`` tuples, e.g. a teacher forward loop.

    Chunks are taken as they come (their size is the producer's). A list (or any re-iterable
    object) can be read several times; a generator only once.
    """

    def __init__(self, iterable: Iterable):
        self.iterable = iterable
        self.rereadable = not (iter(iterable) is iterable)

    def chunks(self, chunk_bytes=DEFAULT_CHUNK_BYTES, *, skip=0, rank=0, world=1, every=1):
        start = 0
        for i, item in enumerate(self.iterable):
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise ValueError(f"chunk {i} must be (embeddings, labels) or (embeddings, labels, teacher_logits)")
            emb = as_tensor("embeddings", item[0])
            if emb.ndim != 2:
                raise ValueError(f"chunk {i}: embeddings must be 2-D, got shape {tuple(emb.shape)}")
            if wanted(i, skip, rank, world, every):
                labels = None if item[1] is None else as_tensor("labels", item[1])
                logits = None if len(item) < 3 or item[2] is None else as_tensor("teacher_logits", item[2])
                yield Chunk(i, start, emb, labels, logits)
            start += emb.shape[0]


SourceLike = Union[EmbeddingSource, np.ndarray, torch.Tensor, str, os.PathLike, Iterable]


def _directory_source(path: str, labels, teacher_logits) -> EmbeddingSource:
    for recognises, opens in _DIRECTORY_SOURCES:
        if recognises(path):
            if labels is not None or teacher_logits is not None:
                raise ValueError(f"{path} is a capture directory: its labels and teacher logits are inside it")
            return opens(path)
    raise ValueError(f"embeddings directory {path} is not a finished capture (no manifest.json of a capture); "
                     "pass a capture directory, or a .npy/.safetensors/.parquet file")


def as_source(embeddings: SourceLike, labels=None, teacher_logits=None) -> EmbeddingSource:
    """Wraps arrays, tensors, file paths (.npy, .safetensors, .parquet) and iterables as a source."""
    if isinstance(embeddings, EmbeddingSource):
        if labels is not None or teacher_logits is not None:
            raise ValueError("labels/teacher_logits belong inside the source when embeddings is a source")
        return embeddings
    if isinstance(embeddings, (np.ndarray, torch.Tensor)):
        return ArraySource(embeddings, labels, teacher_logits)
    if isinstance(embeddings, (str, os.PathLike)):
        path = os.fspath(embeddings)
        if os.path.isdir(path):
            return _directory_source(path, labels, teacher_logits)
        ext = os.path.splitext(path)[1].lower()
        if ext == ".npy":
            return NpySource(path, labels, teacher_logits)
        if ext == ".safetensors":
            return SafetensorsSource(path, labels=labels, teacher_logits=teacher_logits)
        if ext in (".parquet", ".pq"):
            if labels is not None or teacher_logits is not None:
                raise ValueError("for Parquet, name the label/logit columns with ParquetSource(...)")
            return ParquetSource(path)
        raise ValueError(f"embeddings file {path}: unknown extension {ext!r} (use .npy, .safetensors or .parquet)")
    if labels is not None or teacher_logits is not None:
        raise ValueError("labels/teacher_logits must be inside the chunks when embeddings is an iterable of chunks")
    if hasattr(embeddings, "__iter__"):
        return IterableSource(embeddings)
    raise TypeError(
        f"embeddings must be an array, a tensor, a file path, a source or an iterable of chunks, "
        f"got {type(embeddings).__name__}"
    )

