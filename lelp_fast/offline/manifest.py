"""The manifest of a targets directory, and the per-rank progress records that become it.

While a run is going, each rank records the shards it has finished in ``progress-rank<r>.json``
(rewritten atomically after every shard). When all shards exist, rank 0 writes ``manifest.json``
(settings, every shard's row range, files and checksums; no timestamps, so an interrupted and
an uninterrupted run give the same bytes) and removes the progress records.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from typing import Dict, List, Optional

from .._dist import barrier
from ..io import checksum
from . import shards

MANIFEST = "manifest.json"
KIND = "lelp_fast.targets"  # capture directories use the same records with kind "lelp_fast.capture"
VERSION = 1


def projector_digest(projector) -> str:
    """sha256 over the projector's tensors and temperatures (not the package version, not fit timings)."""
    meta = projector.metadata()
    h = hashlib.sha256(json.dumps({k: meta[k] for k in ("num_classes", "n_subclasses", "dim", "beta", "tau")},
                                  sort_keys=True).encode())
    tensors = [projector.A, projector.e, projector.head_weight, projector.head_bias]
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def progress_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"progress-rank{rank}.json")


def write_progress(directory: str, rank: int, settings: dict, entries: List[dict], kind: str = KIND) -> None:
    record = {"kind": kind, "version": VERSION, "settings": settings,
              "shards": sorted(entries, key=lambda e: e["index"])}
    shards.write_atomically(progress_path(directory, rank), _dumps(record), rank)


def _load(path: str, kind: str = KIND) -> dict:
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is corrupt or not a lelp_fast record ({exc}); remove the directory to start "
                         "over") from exc
    if record.get("kind") != kind or record.get("version") != VERSION:
        raise ValueError(f"{path} is not a {kind} record of version {VERSION}")
    return record


def check_settings(path: str, found: dict, wanted: dict) -> None:
    """Refuses to mix outputs made from another source, projector or settings."""
    differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    if not differ:
        return
    if "source_fingerprint" in differ:
        why = ("the source changed since these targets were written (a .npy, safetensors or Parquet source's "
               "fingerprint covers its size and modification time; arrays', teacher-outputs --logits included, "
               "every byte)")
    elif "projector_sha256" in differ:
        why = "they were written with another projector"
    elif differ == ["data"] and wanted.get("data") is None:  # a capture's fingerprint of its rows
        why = "the capture there recorded a fingerprint of its rows and none was given now (pass the same data=)"
    elif differ == ["data"]:  # the two hashes alone said nothing
        why = ("the rows captured there are not the rows given now (their fingerprint, data, differs; a text "
               "capture's covers the texts, labels, tokenizer, max_length and batch size)")
    else:
        why = "they were written with other settings"
    details = ", ".join(f"{k}: {found.get(k)!r} there, {wanted.get(k)!r} now" for k in differ)
    raise ValueError(f"{path}: {why} ({details}); write to a new output directory or remove this one")


def file_problem(directory: str, info: dict, checksums: bool = True) -> Optional[str]:
    """Why a recorded file (``{"file", "bytes", checksums}``: a shard's, a capture's head) is not intact
    (missing, of the wrong size, or with another checksum when ``checksums``), or None."""
    path = os.path.join(directory, info["file"])
    if not os.path.exists(path):
        return f"{path} is recorded as written but is missing"
    size = os.path.getsize(path)
    if size != info["bytes"]:
        return f"{path} is truncated or corrupt: {size} bytes, expected {info['bytes']}"
    failed = checksums and checksum.file_mismatch(path, info)
    return f"{path} is corrupt: its {failed} checksum does not match the record" if failed else None


def shard_problem(directory: str, entry: dict, checksums: bool = True) -> Optional[str]:
    """Why a recorded shard is not intact (``file_problem`` of its first damaged file), or None."""
    for info in entry["files"].values():
        problem = file_problem(directory, info, checksums)
        if problem:
            return f"shard file {problem}"
    return None


def verify_shard(directory: str, entry: dict, checksums: bool = True) -> None:
    """Raises naming the file when a recorded shard file is missing, truncated or corrupt."""
    problem = shard_problem(directory, entry, checksums)
    if problem:
        raise ValueError(f"{problem}; remove the directory to start over")


def finished_shards(directory: str, settings: dict, verify: bool = True, checksums: bool = True,
                    kind: str = KIND) -> Dict[int, dict]:
    """Shards recorded by any rank's progress file (checked against the settings and, with
    ``verify``, the files: sizes, and checksums with ``checksums``)."""
    done: Dict[int, dict] = {}
    for path in sorted(glob.glob(os.path.join(directory, "progress-rank*.json"))):
        record = _load(path, kind)
        check_settings(path, record["settings"], settings)
        for entry in record["shards"]:
            if verify:
                verify_shard(directory, entry, checksums)
            done[entry["index"]] = entry
    return done


def damaged_shards(directory: str, manifest: dict, checksums: bool) -> Dict[int, str]:
    """The shards of a finished manifest that are missing or corrupt: index -> why."""
    damaged = {}
    for entry in manifest["shards"]:
        problem = shard_problem(directory, entry, checksums)
        if problem:
            damaged[entry["index"]] = problem
    return damaged


def reopen(directory: str, manifest: dict, damaged: Dict[int, str], kind: str = KIND) -> None:
    """Turns a finished directory with damaged shards back into a partial run: the intact shards
    become rank 0's progress record, the damaged ones are removed, the manifest goes last."""
    intact = [e for e in manifest["shards"] if e["index"] not in damaged]
    for entry in manifest["shards"]:
        if entry["index"] in damaged:
            for info in entry["files"].values():
                path = os.path.join(directory, info["file"])
                if os.path.exists(path):
                    os.unlink(path)
    write_progress(directory, 0, manifest["settings"], intact, kind)
    os.unlink(os.path.join(directory, MANIFEST))
    shards.fsync_directory(directory)


def finished_run(directory: str, settings: dict, verify: bool, rank: int, process_group,
                 kind: str = KIND) -> Optional[dict]:
    """A finished directory's manifest when its settings match and every shard is intact (checksums
    with ``verify``, else sizes). With missing or corrupt shards, rank 0 turns it back into a
    partial run (with a warning) and None is returned, as for a directory that never finished."""
    manifest = read_manifest(directory, kind)
    if manifest is None:
        return None
    check_settings(os.path.join(directory, MANIFEST), manifest["settings"], settings)
    damaged = damaged_shards(directory, manifest, checksums=verify)
    if not damaged:
        return manifest
    if rank == 0:
        warnings.warn(f"{directory}: {len(damaged)} shard(s) missing or corrupt ({next(iter(damaged.values()))}); "
                      "rewriting them", RuntimeWarning, stacklevel=3)
        reopen(directory, manifest, damaged, kind)
    barrier(process_group)
    return None


def own_progress(directory: str, rank: int, kind: str = KIND) -> List[dict]:
    """The shards this rank recorded before (kept when it rewrites its progress file)."""
    path = progress_path(directory, rank)
    return _load(path, kind)["shards"] if os.path.exists(path) else []


def recorded_settings(directory: str, kind: str = KIND) -> Optional[dict]:
    """The settings a finished or partial run recorded in ``directory`` (its manifest's, else a progress
    file's), or None where there is no run."""
    paths = [os.path.join(directory, MANIFEST)] + sorted(glob.glob(os.path.join(directory, "progress-rank*.json")))
    for path in paths:
        if os.path.exists(path):
            return _load(path, kind)["settings"]
    return None


def read_manifest(directory: str, kind: str = KIND) -> Optional[dict]:
    path = os.path.join(directory, MANIFEST)
    return _load(path, kind) if os.path.exists(path) else None


def write_manifest(directory: str, settings: dict, entries: Dict[int, dict], kind: str = KIND,
                   extra: Optional[dict] = None) -> dict:
    """The final manifest; every chunk 0..n-1 must be present, rows contiguous. ``extra``: more
    top-level records (a capture's head file)."""
    ordered = [entries[i] for i in sorted(entries)]
    row = 0
    for i, entry in enumerate(ordered):
        if entry["index"] != i or entry["rows"][0] != row:
            raise RuntimeError(f"shard {i} is missing or out of place; the run is not complete")
        row = entry["rows"][1]
    if settings.get("n_rows") is not None and row != settings["n_rows"]:
        raise RuntimeError(f"the shards cover {row} rows, the source has {settings['n_rows']}")
    manifest = {"kind": kind, "version": VERSION, "status": "complete", "settings": settings, "n_rows": row,
                "shards": ordered, **(extra or {})}
    shards.write_atomically(os.path.join(directory, MANIFEST), _dumps(manifest))
    for path in glob.glob(os.path.join(directory, "progress-rank*.json")):
        os.unlink(path)
    shards.fsync_directory(directory)
    return manifest
