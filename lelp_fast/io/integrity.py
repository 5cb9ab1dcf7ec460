"""Checksums and file modes shared by every artefact writer (projectors, checkpoints)."""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Mapping

import torch


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: str) -> None:
    """Gives a temp file (mkstemp makes it 0600) the mode a plain ``open`` would under the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def temp_prefix(path: str) -> str:
    """The prefix of the temp files written for ``path`` (so a later run can find its own stale ones)."""
    return f".tmp-{os.path.basename(path)}-"


def remove_stale_temps(path: str) -> int:
    """Removes temp files a killed writer of ``path`` left behind; returns how many. The caller must
    be the only writer of ``path`` (it holds the lock on it)."""
    pattern = os.path.join(os.path.dirname(os.path.abspath(path)), glob.escape(temp_prefix(path)) + "*")
    removed = 0
    for stale in glob.glob(pattern):
        try:
            os.unlink(stale)
            removed += 1
        except FileNotFoundError:
            pass
    return removed
