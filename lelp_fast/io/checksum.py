"""The checksums a store records for each file it writes, and the one checked where it is read.

Every shard's manifest entry holds two digests of the file's bytes:

- ``sha256``, for other tools (``sha256sum``);
- ``xxh3_128`` (XXH3, 128 bits, from the ``xxhash`` package; ``xxhsum -H2`` checks it), which is
  what the readers verify. On one core of the machine in docs/benchmarks.md, sha256 hashed 256 MB
  in memory at 1.3 GB/s, slower than offline targets read a capture there (about 2 GB/s), so
  verifying with it nearly doubled that job; XXH3-128 hashed the same bytes at 8.5-11 GB/s, and the
  read-ahead thread does it while the previous shard is computed (docs/benchmarks.md has the cost).

Both detect a damaged file (a flipped byte, a truncation, another file's bytes); neither is meant to
stop someone who rewrites a file on purpose. Entries written before ``xxh3_128`` was recorded hold
only ``sha256`` and are checked with it.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional

import xxhash

FAST = "xxh3_128"
BLOCK = 1 << 22  # bytes read at a time when a file is hashed from disk


class CorruptFileError(ValueError):
    """A file whose bytes do not match its recorded checksum (or cannot be parsed)."""


def record(data) -> dict:
    """The checksums to record for ``data`` (bytes-like)."""
    return {"sha256": hashlib.sha256(data).hexdigest(), FAST: xxhash.xxh3_128_hexdigest(data)}


def mismatch(data, recorded: Mapping[str, str]) -> Optional[str]:
    """The name of the recorded checksum ``data`` fails (the fast one when recorded), or None."""
    if FAST in recorded:
        return None if xxhash.xxh3_128_hexdigest(data) == recorded[FAST] else FAST
    return None if hashlib.sha256(data).hexdigest() == recorded["sha256"] else "sha256"


def file_mismatch(path: str, recorded: Mapping[str, str]) -> Optional[str]:
    """:func:`mismatch` of a file, read in blocks (for files that are checked, not used)."""
    name = FAST if FAST in recorded else "sha256"
    digest = xxhash.xxh3_128() if name == FAST else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return None if digest.hexdigest() == recorded[name] else name


def check(data, recorded: Optional[Mapping[str, str]], path: str, hint: str = "") -> None:
    """Raises :class:`CorruptFileError` naming ``path`` unless ``data`` matches ``recorded`` (None: no check)."""
    if recorded is None:
        return
    failed = mismatch(data, recorded)
    if failed:
        raise CorruptFileError(f"{path} is corrupt: its {failed} checksum does not match the manifest{hint}")
