"""Shard files of stored targets: encoding per format, atomic writes, checksums, reading back.

A shard holds the rows of one source chunk. Its fields are ``log_targets`` (N x K), or in the
compact form ``u`` (N x K subclass coordinates) and ``teacher_logits`` (N x C), from which the
targets can be recomputed at any β, τ at training time; and, where the source has labels,
``labels`` (N,), so that a reader joining the targets to a dataset can tell that the dataset's rows
are the rows the targets were made from, in order (since session 65). Formats:

- ``npy``: one ``.npy`` per field (memory-mappable; bfloat16 is stored as its uint16 bits);
- ``safetensors``: one file per shard, every field a tensor (bfloat16 native);
- ``parquet``: one file per shard, a fixed-size-list column per field plus a ``row`` column
  (float32 or float16; Parquet has no bfloat16).
"""

from __future__ import annotations

import errno
import glob
import io
import os
import tempfile
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch

from ..io import mapped
from ..io.integrity import publish_mode

FORMATS = ("npy", "safetensors", "parquet")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The one default of the stored targets' dtype (Python API, CLI and config): log-targets need no
# more than fp16's 11 bits, and half the bytes is half the read at training time.
DEFAULT_DTYPE = "float16"


# The fields of the stores of plain teacher outputs (offline/teacher_store.py), by settings["kind"].
KIND_FIELDS = {"teacher_logits": ["teacher_logits"], "teacher_topk": ["topk_log_probs", "topk_indices"]}


LABELS = "labels"  # the source's label of each row, stored beside its targets


def row_labels(labels) -> torch.Tensor:
    """The source's labels as a shard stores them: int16 where they fit (2 bytes a row), else int64."""
    y = torch.as_tensor(labels).reshape(-1).cpu().long()
    fits = y.numel() == 0 or (int(y.min()) >= -(1 << 15) and int(y.max()) < (1 << 15))
    return y.to(torch.int16) if fits else y


def check_format(format: str, dtype: str) -> None:
    """A storable (format, dtype) pair, or a one-line error naming the argument."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if format == "parquet" and dtype == "bfloat16":
        raise ValueError("format='parquet' stores float32 or float16 (Parquet has no bfloat16)")


def fields(compact: bool, kind: str = "lelp") -> List[str]:
    if kind in KIND_FIELDS:
        return KIND_FIELDS[kind]
    return ["u", "teacher_logits"] if compact else ["log_targets"]


def shard_files(fmt: str, index: int, compact: bool, names: Optional[List[str]] = None) -> Dict[str, str]:
    """File name per field (npy; ``names``, default the LELP fields), or the one file under the key
    ``"*"`` (safetensors, parquet)."""
    base = f"shard-{index:06d}"
    if fmt == "npy":
        return {field: f"{base}.{field}.npy" for field in (names or fields(compact))}
    return {"*": f"{base}.{fmt}"}


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def encode(fmt: str, tensors: Dict[str, torch.Tensor], start_row: int) -> Dict[str, bytes]:
    """The bytes of each file of one shard (same keys as :func:`shard_files`)."""
    if fmt == "npy":
        out = {}
        for name, t in tensors.items():
            buf = io.BytesIO()
            np.save(buf, _numpy(t), allow_pickle=False)
            out[name] = buf.getvalue()
        return out
    if fmt == "safetensors":
        from safetensors.torch import save

        return {"*": save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          metadata={"start_row": str(start_row)})}
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = next(iter(tensors.values())).shape[0]
    columns = {"row": pa.array(np.arange(start_row, start_row + n, dtype=np.int64))}
    for name, t in tensors.items():
        flat = pa.array(_numpy(t).reshape(-1))
        columns[name] = flat if t.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, t.shape[1])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return {"*": sink.getvalue().to_pybytes()}


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_prefix(rank: int) -> str:
    """Temp files carry their rank, so a rerun removes its own leftovers of a killed run and never
    a file another rank is writing."""
    return f".tmp-rank{rank}-"


def to_stored(name: str, t: torch.Tensor, dtype: torch.dtype, first_row: int, setting: str) -> torch.Tensor:
    """``t`` in the stored dtype, refused naming the row where a finite value becomes inf (float16's
    range ends at 65504: a teacher logit of 7e4 was stored as inf and read back as NaN targets)."""
    if t.dtype == dtype:  # no conversion (the targets op writes the stored dtype itself): nothing to lose
        return t
    stored = t.to(dtype)
    if not bool(torch.isinf(stored).any()):  # one pass over the stored copy in the common case
        return stored
    lost = torch.isinf(stored) & torch.isfinite(t)
    if bool(lost.any()):
        row, col = (int(i) for i in torch.nonzero(lost)[0])
        raise ValueError(f"{name} row {first_row + row} holds {float(t[row, col]):.6g}, beyond {str(dtype).split('.')[-1]}'s "
                         f"range: store with {setting} float32 or bfloat16")
    return stored


def remove_stale_temp_files(directory: str, rank: int) -> None:
    for path in glob.glob(os.path.join(directory, temp_prefix(rank) + "*")):
        os.unlink(path)


def write_atomically(path: str, data: bytes, rank: int = 0) -> None:
    """Temp file in the same directory, fsync, rename: the path holds the old or the new bytes,
    never a part. A full disk raises an OSError saying so; the temp file is removed."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(rank), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)  # mkstemp's 0600 would hide the outputs from other users' loaders
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing {path}; nothing was recorded for it") from exc
        raise


def read(fmt: str, directory: str, files: Dict[str, str], dtype: str,
         checksums: Optional[Dict[str, dict]] = None, hint: str = "") -> Dict[str, torch.Tensor]:
    """The fields of one shard as tensors: ``npy`` and ``safetensors`` as views of the memory-mapped
    files, ``parquet`` decoded. With ``checksums`` (the recorded checksums per key of ``files``) each
    file is hashed as it is read, on the same bytes the tensors come from, and a mismatch raises
    naming the file."""
    sums = checksums or {}
    if fmt == "npy":
        arrays = {name: mapped.npy_array(os.path.join(directory, file), sums.get(name), hint)
                  for name, file in files.items()}
    elif fmt == "safetensors":
        arrays = mapped.safetensors_arrays(os.path.join(directory, files["*"]), sums.get("*"), hint)
    else:
        arrays = _parquet_arrays(os.path.join(directory, files["*"]), sums.get("*"), hint)
    out = {}
    for name, arr in arrays.items():
        with warnings.catch_warnings():  # a read-only map: the tensors are only ever read
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        out[name] = t.view(torch.bfloat16) if dtype == "bfloat16" and arr.dtype == np.uint16 else t
    return out


def _parquet_arrays(path: str, checksums: Optional[dict], hint: str) -> Dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(mapped.read_bytes(path, checksums, hint)))
    out = {}
    for name in table.column_names:
        if name == "row":
            continue
        col = table.column(name).combine_chunks()
        if not pa.types.is_fixed_size_list(col.type):  # labels: one value a row
            out[name] = col.to_numpy(zero_copy_only=False)
            continue
        values = col.values.to_numpy(zero_copy_only=False)
        out[name] = values.reshape(len(col), col.type.list_size)
    return out
