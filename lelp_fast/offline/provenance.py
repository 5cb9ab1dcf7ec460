"""What an output was made from: settings and input fingerprints, compared on every rerun.

A stage (capture, fit, targets, training) records beside its output the settings that shape the
result and the fingerprints of its inputs. A rerun compares them with what it would use now:
equal means the output can be reused; otherwise :func:`changes` says what differs, in the words
a user reads ("fit.beta 0.25 -> 0.05", "input targets changed"), and the stage is done again.
Settings that only say *how* a result is computed (device, chunk size, progress bars) are left
out by the callers, so changing them reuses the output.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

from . import shards

VERSION = 1


def digest(obj) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys), 16 hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    """sha256 of a small file's bytes (a manifest, which itself lists its shards' checksums)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def flatten(obj, prefix: str = "") -> Dict[str, object]:
    """Nested dicts as ``{"fit.beta": 0.25, ...}`` (an empty dict adds no key: ``kwargs: {}`` and a
    missing ``kwargs`` say the same)."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: Dict[str, object] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def changes(old: dict, new: dict) -> List[str]:
    """What differs between two records: ``["fit.beta 0.25 -> 0.05", "input targets changed"]``."""
    out = []
    before, after = flatten(old.get("settings", {})), flatten(new.get("settings", {}))
    for key in sorted(set(before) | set(after)):
        if before.get(key, "<unset>") != after.get(key, "<unset>"):
            out.append(f"{key} {before.get(key, '<unset>')} -> {after.get(key, '<unset>')}")
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(key) != new_inputs.get(key):
            out.append(f"input {key} changed")
    return out


def record(settings: dict, inputs: Optional[dict] = None) -> dict:
    """The record of what an output is made from (JSON-able; plain values only)."""
    return json.loads(json.dumps({"version": VERSION, "settings": settings, "inputs": inputs or {}},
                                 sort_keys=True, default=str))


def read(path: str) -> Optional[dict]:
    """A stored record, or None when there is none (or an unreadable one: the output is redone)."""
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("version") == VERSION else None


def read_json(path: str):
    """A JSON output file (a report); one that does not parse is named as corrupt, so that a run
    records it against the stage that wrote it and makes it again."""
    with open(path, "rb") as f:
        blob = f.read()
    try:
        return json.loads(blob)
    except ValueError as exc:
        raise ValueError(f"{path} is corrupt: not readable JSON ({exc})") from None


def write(path: str, stored: dict) -> None:
    """Writes a record (atomically; read back by :func:`read`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stored = {**stored, "version": VERSION}
    shards.write_atomically(path, (json.dumps(stored, indent=1, sort_keys=True) + "\n").encode())
