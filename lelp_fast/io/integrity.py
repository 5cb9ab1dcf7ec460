"""Checksums and file modes shared by every artefact writer (projectors, checkpoints, students)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import struct
import tempfile
from typing import Callable, Dict, Mapping, Optional

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


def write_through_temp(write: Callable[[str], None], path: str) -> None:
    """``write(tmp)``, then a rename onto ``path``: a killed or failing writer leaves the old file or
    none, never a part of one that looks complete (projectors, fit checkpoints, exports). ``tmp`` has
    ``path``'s own name, in a temp directory beside it: torch's archives (torch.export's .pt2,
    TorchScript) name their contents after the file, so a random temp name made every export's bytes
    differ, and a name without a suffix broke torch's writer."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp_dir = tempfile.mkdtemp(prefix=temp_prefix(path), dir=directory)
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    try:
        write(tmp)
        publish_mode(tmp)  # as a plain open would make it under the umask
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def remove_stale_temps(path: str) -> int:
    """Removes temp files a killed writer of ``path`` left behind; returns how many. The caller must
    be the only writer of ``path`` (it holds the lock on it)."""
    pattern = os.path.join(os.path.dirname(os.path.abspath(path)), glob.escape(temp_prefix(path)) + "*")
    removed = 0
    for stale in glob.glob(pattern):
        try:
            shutil.rmtree(stale) if os.path.isdir(stale) else os.unlink(stale)  # write_through_temp's directory
            removed += 1
        except FileNotFoundError:
            pass
    return removed


SEAL = b"lelp_fast sealed v1 sha256="


def seal(blob: bytes) -> bytes:
    """``blob`` preceded by its sha256, so one atomically renamed file carries its own checksum
    (a kill can never leave the data and its checksum out of step, as two files could)."""
    return SEAL + hashlib.sha256(blob).hexdigest().encode() + b"\n" + blob


def unseal(data: bytes, path: str) -> bytes:
    """The blob of :func:`seal`'s output; raises naming ``path`` when it is not intact."""
    head = len(SEAL) + 65
    if not data.startswith(SEAL) or len(data) < head:
        raise ValueError(f"{path} is not a lelp_fast sealed file (truncated or written by another tool); "
                         "delete it to start over")
    digest, blob = data[len(SEAL):head - 1].decode(errors="replace"), data[head:]
    if hashlib.sha256(blob).hexdigest() != digest:
        raise ValueError(f"{path} fails its sha256 checksum (corrupt); delete it to start over")
    return blob


CHECKSUM_KEY = "tensors_sha256"
METADATA_CHECKSUM_KEY = "metadata_sha256"


def with_metadata_checksum(meta: dict) -> dict:
    """``meta`` (JSON-able, its tensors' checksum included) with the sha256 of its own JSON: the
    settings stored beside the tensors (a projector's β and τ, a checkpoint's position) are covered
    too, so a flipped bit there is an error, not a silently other result."""
    return {**meta, METADATA_CHECKSUM_KEY: _json_sha256(meta)}


def check_metadata_checksum(meta: dict, path: str, advice: str, required: bool = False) -> dict:
    """``meta`` without its metadata checksum, after checking it; a file written before session 65
    has none and is taken as it is, unless its format says it has one (``required``)."""
    meta = dict(meta)
    claimed = meta.pop(METADATA_CHECKSUM_KEY, None)
    if (claimed is not None or required) and claimed != _json_sha256(meta):
        raise ValueError(f"{path}: its metadata fails its sha256 checksum (corrupt file); {advice}")
    return meta


def _json_sha256(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def save_checked(tensors: Mapping[str, torch.Tensor], metadata: Optional[dict] = None) -> bytes:
    """safetensors bytes whose metadata holds the tensors' sha256 (verified by :func:`load_checked`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save(tensors, metadata={**(metadata or {}), CHECKSUM_KEY: tensors_sha256(tensors)})


def load_checked(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a :func:`save_checked` file, refused naming the file when they fail the checksum.
    The file is read once: the tensors and the header's metadata come from the same bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        with open(path, "rb") as f:
            data = f.read()
        tensors = load(data)
        n = struct.unpack("<Q", data[:8])[0]
        metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, struct.error) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); it is truncated or corrupt") from None
    stored = metadata.get(CHECKSUM_KEY)
    if stored is None:
        raise ValueError(f"{path} carries no {CHECKSUM_KEY}: it was not written by lelp_fast (or by an older "
                         "version); write it again")
    if tensors_sha256(tensors) != stored:
        raise ValueError(f"{path} fails its sha256 checksum (corrupt); write it again")
    return tensors
