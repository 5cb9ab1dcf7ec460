"""Memory-mapped reads of ``.npy`` and ``.safetensors`` files, checksummed on the same mapping.

Hashing a file and then loading it reads it twice, and checks bytes other than the ones used. Here
one read-only mapping serves both: with the file's recorded checksums given (its manifest entry;
:mod:`.checksum` says which one is checked), the mapping is hashed once as it is opened (the pages
it brings in are the ones the arrays then read from the page cache), and the arrays are zero-copy
views of that mapping, so a batch gathered from them is a slice of the file.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import struct
from typing import Dict, Mapping, Optional

import numpy as np

from .checksum import CorruptFileError, check

# safetensors dtype names -> numpy; bfloat16 is returned as its uint16 bits (the caller views it).
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}

__all__ = ["CorruptFileError", "map_file", "npy_array", "safetensors_arrays", "read_bytes"]


Checksums = Optional[Mapping[str, str]]  # a manifest's file entry ("sha256", "xxh3_128"), or None: no check


def map_file(path: str, checksums: Checksums = None, hint: str = "") -> memoryview:
    """A read-only mapping of ``path``; with ``checksums``, refused (naming the file) unless it matches."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            buf = memoryview(b"")
        else:
            buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))  # the map outlives the fd
    check(buf, checksums, path, hint)
    return buf


def npy_array(path: str, checksums: Checksums = None, hint: str = "") -> np.ndarray:
    """The array of a ``.npy`` file as a view of its mapping (C order, no pickles)."""
    buf = map_file(path, checksums, hint)
    try:
        head = io.BytesIO(bytes(buf[:min(len(buf), 65536)]))
        version = np.lib.format.read_magic(head)
        if version not in ((1, 0), (2, 0)):  # np.save writes 1.0 (2.0 for huge headers)
            raise ValueError(f"unsupported .npy version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(head)
    except (ValueError, OSError, SyntaxError) as exc:
        raise CorruptFileError(f"{path} is not a readable .npy file ({exc}){hint}") from None
    if fortran or dtype.hasobject:
        raise CorruptFileError(f"{path}: a Fortran-order or object .npy cannot be mapped{hint}")
    count = int(np.prod(shape))
    offset = head.tell()
    if offset + count * dtype.itemsize != len(buf):
        raise CorruptFileError(f"{path} is truncated or corrupt: {len(buf)} bytes for a {shape} {dtype} array{hint}")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)


def safetensors_arrays(path: str, checksums: Checksums = None, hint: str = "") -> Dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a view of its mapping (bfloat16 as uint16 bits)."""
    buf = map_file(path, checksums, hint)
    try:
        (n,) = struct.unpack("<Q", bytes(buf[:8]))
        header = json.loads(bytes(buf[8:8 + n]))
    except (struct.error, ValueError) as exc:
        raise CorruptFileError(f"{path} is not a readable .safetensors file ({exc}){hint}") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CorruptFileError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not mapped here{hint}")
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"]))
        if end - start != count * dtype.itemsize or 8 + n + end > len(buf):
            raise CorruptFileError(f"{path} is truncated or corrupt: tensor {name} does not fit{hint}")
        out[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + start).reshape(info["shape"])
    return out


def read_bytes(path: str, checksums: Checksums = None, hint: str = "") -> bytes:
    """The whole file (formats that are decoded, not mapped: Parquet), checked like :func:`map_file`."""
    with open(path, "rb") as f:
        data = f.read()
    check(data, checksums, path, hint)
    return data
