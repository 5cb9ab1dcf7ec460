"""Which checksum is recorded and which is verified where a shard is read (lelp_fast/io/checksum.py).

Verifying on read costs one hash pass over the bytes used; with sha256 that pass nearly doubled
offline targets from a capture (docs/benchmarks.md), so the readers verify XXH3-128, recorded beside
sha256. Manifests written before that hold sha256 only and are still verified with it.
"""

import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
import xxhash
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lelp_fast import LELPProjector, TargetsDataset, generate_targets
from lelp_fast.capture import CaptureSource, capture
from lelp_fast.io import checksum


@pytest.fixture
def stores(tmp_path):
    """A capture (3 shards) and the offline targets made from it (npy shards)."""
    torch.manual_seed(0)
    x = torch.randn(96, 6)
    y = (x[:, 0] > 0).long()
    teacher = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    cap = str(tmp_path / "cap")
    capture(teacher, DataLoader(TensorDataset(x, y), batch_size=16), cap, dtype="float32", batches_per_shard=2)
    projector = LELPProjector(2).fit(cap)
    targets = str(tmp_path / "targets")
    generate_targets(projector, cap, targets, chunk_bytes=1024)
    return cap, targets


def _entries(directory: str):
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    return manifest, [info for entry in manifest["shards"] for info in entry["files"].values()]


def _flip_last_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x20]))


def test_every_shard_records_sha256_and_xxh3(stores):
    for directory in stores:
        _, infos = _entries(directory)
        assert len(infos) >= 3
        for info in infos:
            data = open(os.path.join(directory, info["file"]), "rb").read()
            assert info["sha256"] == hashlib.sha256(data).hexdigest()
            assert info["xxh3_128"] == xxhash.xxh3_128_hexdigest(data)


def test_reads_verify_xxh3_and_never_hash_sha256(stores, monkeypatch):
    """The read path checks every shard (a flipped byte is caught) with the fast hash only."""
    cap, targets = stores

    def no_sha256(*args, **kwargs):
        raise AssertionError("sha256 computed on the read path")

    hashed = []
    monkeypatch.setattr(checksum, "hashlib", SimpleNamespace(sha256=no_sha256))  # the checksum module's only
    monkeypatch.setattr(checksum, "xxhash", SimpleNamespace(
        xxh3_128_hexdigest=lambda data: hashed.append(len(data)) or xxhash.xxh3_128_hexdigest(data)))
    CaptureSource(cap).tensors()
    TargetsDataset(targets).targets(range(96))
    assert len(hashed) == len(_entries(cap)[1]) + len(_entries(targets)[1])  # each shard once
    _, infos = _entries(targets)
    _flip_last_byte(os.path.join(targets, infos[1]["file"]))
    with pytest.raises(ValueError, match=f"{infos[1]['file']} is corrupt: its xxh3_128 checksum does not match"):
        TargetsDataset(targets).targets(range(96))


def test_a_manifest_without_xxh3_is_verified_with_sha256(stores):
    """Stores written before XXH3 was recorded: the sha256 they hold is checked, on read and on a rerun."""
    cap, targets = stores
    for directory in (cap, targets):
        manifest, infos = _entries(directory)
        for info in infos:
            del info["xxh3_128"]
        with open(os.path.join(directory, "manifest.json"), "w") as f:
            json.dump(manifest, f)
    CaptureSource(cap).tensors()
    TargetsDataset(targets).targets(range(96))
    _, infos = _entries(cap)
    _flip_last_byte(os.path.join(cap, infos[0]["file"]))
    with pytest.raises(ValueError, match=f"{infos[0]['file']} is corrupt: its sha256 checksum does not match"):
        CaptureSource(cap).tensors()
    _, infos = _entries(targets)
    path = os.path.join(targets, infos[0]["file"])
    _flip_last_byte(path)
    with pytest.raises(ValueError, match="is corrupt: its sha256 checksum does not match"):
        TargetsDataset(targets).targets(range(96))
    assert checksum.file_mismatch(path, infos[0]) == "sha256"


def test_file_mismatch_reads_in_blocks_and_names_the_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(checksum, "BLOCK", 7)  # many blocks: the streamed digest equals the one-shot one
    path = tmp_path / "f.bin"
    data = os.urandom(1000)
    path.write_bytes(data)
    recorded = checksum.record(data)
    assert checksum.file_mismatch(str(path), recorded) is None
    assert checksum.file_mismatch(str(path), {"sha256": recorded["sha256"]}) is None
    assert checksum.file_mismatch(str(path), {**recorded, "xxh3_128": "0" * 32}) == "xxh3_128"
    assert checksum.mismatch(data, {"sha256": "0" * 64}) == "sha256"
    checksum.check(data, None, "f.bin")  # None: no check
    with pytest.raises(checksum.CorruptFileError, match="f.bin is corrupt: its xxh3_128 checksum"):
        checksum.check(data[:-1], recorded, "f.bin")


def test_a_damaged_first_capture_shard_is_refused_where_it_is_read(stores, tmp_path):
    """The first shard's widths come from its header when the source opens; its checksum is checked
    where it is read, like every other shard's."""
    cap, _ = stores
    _, infos = _entries(cap)
    unchecked = LELPProjector(2).fit(CaptureSource(cap, verify=False))  # before the damage: a fit of the damaged
    _flip_last_byte(os.path.join(cap, infos[0]["file"]))  # rows refuses its head, whose logits they no longer are
    source = CaptureSource(cap)
    assert (source.dim, source.num_classes) == (8, 2)
    message = f"{infos[0]['file']} is corrupt: its xxh3_128 checksum does not match"
    with pytest.raises(ValueError, match=message):
        next(iter(source.chunks()))
    with pytest.raises(ValueError, match=message):
        LELPProjector(2).fit(cap)
    with pytest.raises(ValueError, match=message):
        generate_targets(unchecked, cap, str(tmp_path / "t2"))
    with pytest.raises(ValueError, match="its stored head no longer gives its teacher logits .*a shard may be damaged"):
        LELPProjector(2).fit(CaptureSource(cap, verify=False))  # its last logit's top byte flipped
