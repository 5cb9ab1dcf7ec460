"""Embedding sources (and, later, target writers)."""

from .sources import (
    ArraySource,
    Chunk,
    EmbeddingSource,
    IterableSource,
    NpySource,
    ParquetSource,
    SafetensorsSource,
    as_source,
)

__all__ = [
    "ArraySource",
    "Chunk",
    "EmbeddingSource",
    "IterableSource",
    "NpySource",
    "ParquetSource",
    "SafetensorsSource",
    "as_source",
]
