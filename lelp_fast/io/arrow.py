"""Stored shards as Arrow tables and a Hugging Face ``datasets.Dataset``, without copying.

A (rows x width) array becomes a ``FixedSizeList`` column whose values buffer *is* the array's
memory: for memory-mapped ``.npy`` / ``.safetensors`` shards the dataset reads the files' pages,
nothing is loaded or converted up front. Arrow has no bfloat16, so bfloat16 columns are widened to
float32 (a copy); Parquet shards are decoded (compressed columns cannot be mapped).
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch


def column(values) -> "object":
    """A 1-D array as a primitive Arrow array, a 2-D one as a fixed-size-list array (zero-copy for
    C-contiguous numeric arrays)."""
    import pyarrow as pa

    if torch.is_tensor(values):
        values = values.float() if values.dtype == torch.bfloat16 else values
        values = values.detach().cpu().numpy()
    values = np.ascontiguousarray(values)
    if values.ndim == 1:
        return pa.array(values)
    if values.ndim != 2:
        raise ValueError(f"only 1-D and 2-D arrays become Arrow columns, got shape {values.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def table(arrays: Dict[str, object]) -> "object":
    """One shard's fields as an Arrow table (column order as given)."""
    import pyarrow as pa

    return pa.table({name: column(values) for name, values in arrays.items()})


def hf_dataset(tables: List[object]):
    """The shards' tables, in order, as one ``datasets.Dataset`` (chunks kept, nothing copied)."""
    try:
        import datasets
        from datasets.table import InMemoryTable
    except ImportError:
        raise ImportError("to_hf_dataset needs the datasets package: pip install 'lelp_fast[datasets]'") from None
    import pyarrow as pa

    if not tables:
        raise ValueError("there are no shards to make a dataset of")
    return datasets.Dataset(InMemoryTable(pa.concat_tables(tables)))
