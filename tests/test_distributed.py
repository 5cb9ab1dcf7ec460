"""The fit across 2 gloo processes equals the single-process fit."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lelp_fast import LELPProjector
from conftest import make_problem

CHUNK_BYTES = 20 * 4 * 90  # 90 rows per chunk: 10 chunks, dealt round-robin to the ranks


def _data():
    h, w, b, y = make_problem(n=900, d=20, num_classes=3, seed=51)
    return (h - h.mean(0)).float(), w, b, y


def _worker(rank, world, init_file, out_dir, method):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        h, w, b, y = _data()
        p = LELPProjector(3, method=method).fit(
            h, y, head_weight=w, head_bias=b, chunk_bytes=CHUNK_BYTES, process_group=dist.group.WORLD
        )
        p.save(os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["exact", "nystrom"])
def test_two_gloo_ranks_match_single_process(tmp_path, method):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), method), nprocs=2, join=True)
    h, w, b, y = _data()
    single = LELPProjector(3, method=method).fit(h, y, head_weight=w, head_bias=b, chunk_bytes=CHUNK_BYTES)
    for rank in range(2):
        got = LELPProjector.load(tmp_path / f"rank{rank}.safetensors")
        torch.testing.assert_close(got.A, single.A, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.e, single.e, atol=1e-6, rtol=0)
        assert torch.equal(got.class_counts, single.class_counts)


def _resume_worker(rank, world, init_file, out_dir, stop, expect_error):
    from lelp_fast.fit import engine

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    original = engine.accumulate
    if stop:
        engine.accumulate = lambda *a, **k: original(*a, stop_after_chunks=stop, **k)
    try:
        h, w, b, y = _data()
        p = LELPProjector(3, method="nystrom").fit(
            h, y, head_weight=w, head_bias=b, chunk_bytes=CHUNK_BYTES, process_group=dist.group.WORLD,
            checkpoint=os.path.join(out_dir, "fit.ckpt"), checkpoint_every=1, resume=True)
        p.save(os.path.join(out_dir, f"resumed{rank}.safetensors"))
    except (KeyboardInterrupt, ValueError) as exc:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(str(exc))
    finally:
        engine.accumulate = original
        dist.destroy_process_group()


def test_ranks_resuming_in_different_passes_are_refused(tmp_path):
    """A rank killed right after a pass's all_reduce (checkpoint in the next pass) and one killed before
    it: the resumed fit wrote a projector with A off by 0.36. Now every rank refuses before writing."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from safetensors import safe_open
    from safetensors.torch import save_file
    import json

    from lelp_fast.io.integrity import with_metadata_checksum

    mp.spawn(_resume_worker, args=(2, str(tmp_path / "init1"), str(tmp_path), 2, False), nprocs=2, join=True)
    ckpt1 = str(tmp_path / "fit.ckpt.rank1")
    with safe_open(ckpt1, framework="pt") as f:  # rank 1 as if it had reached the next pass
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("metadata_sha256")
    meta.update({"pass": 1, "next_chunk": 0})  # a checkpoint rank 1 could have written: its checksum made anew
    save_file(tensors, ckpt1, metadata={"meta": json.dumps(with_metadata_checksum(meta), sort_keys=True)})
    for rank in range(2):
        os.unlink(tmp_path / f"error{rank}.txt")
    mp.spawn(_resume_worker, args=(2, str(tmp_path / "init2"), str(tmp_path), None, True), nprocs=2, join=True)
    for rank in range(2):
        assert "resume in different passes ([0, 1]" in (tmp_path / f"error{rank}.txt").read_text()
        assert not (tmp_path / f"resumed{rank}.safetensors").exists()


def _cli_worker(rank, world, ports, out_dir):
    """One torchrun rank of ``lelp-fast fit``, ``targets`` and ``teacher-outputs``, as torchrun's environment
    starts them; records each command's exit code and whether it left the default group behind."""
    import contextlib
    import io
    import json

    from lelp_fast.cli import main

    h, w, b, y = _data()
    ran = []
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    for port, argv in zip(ports, (
            ["fit", "--embeddings", os.path.join(out_dir, "E.npy"), "--labels", os.path.join(out_dir, "y.npy"),
             "--head-weight", os.path.join(out_dir, "W.npy"), "--head-bias", os.path.join(out_dir, "b.npy"),
             "--subclasses", "3", "--method", "exact", "--chunk-mb", str(CHUNK_BYTES / (1 << 20)), "--quiet",
             "--out", os.path.join(out_dir, "ddp.safetensors")],
            ["targets", "--projector", os.path.join(out_dir, "ddp.safetensors"), "--embeddings",
             os.path.join(out_dir, "E.npy"), "--dtype", "float32", "--chunk-mb", str(CHUNK_BYTES / (1 << 20)),
             "--quiet", "--out", os.path.join(out_dir, "targets")],
            ["teacher-outputs", "--logits", os.path.join(out_dir, "Z.npy"), "--dtype", "float32", "--chunk-mb",
             str(3 * 4 * 90 / (1 << 20)), "--quiet", "--out", os.path.join(out_dir, "kd")])):
        os.environ["MASTER_PORT"] = str(port)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            code = main(argv)
        ran.append([code, dist.is_initialized(), printed.getvalue().startswith("wrote")])
    with open(os.path.join(out_dir, f"cli{rank}.json"), "w") as f:
        json.dump(ran, f)
    os._exit(0)  # what is checked is written; the interpreter's finalisation is not under test


def _free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_cli_under_torchrun_shards_and_ends_its_process_group(tmp_path):
    """``lelp-fast fit``, ``targets`` and ``teacher-outputs`` with torchrun's environment (WORLD_SIZE = 2,
    gloo): the fit equals the single-process fit, the targets and the KD store cover every row once, and
    each command destroys the default
    group it started before returning. Until session 58 the group was left to the interpreter's
    finalisation, where gloo's threads can abort the process after its work is written
    (pytorch/pytorch PR 179291)."""
    import json

    import numpy as np

    from lelp_fast import TargetsDataset

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    h, w, b, y = _data()
    z = (h.double() @ w.T + b).float()
    for name, arr in {"E": h.numpy(), "y": y.numpy(), "W": w.float().numpy(), "b": b.float().numpy(),
                      "Z": z.numpy()}.items():
        np.save(tmp_path / f"{name}.npy", arr)
    mp.spawn(_cli_worker, args=(2, _free_ports(3), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):  # each command: its exit code, the group left alive, and "wrote ..." (rank 0 only)
        assert json.loads((tmp_path / f"cli{rank}.json").read_text()) == [[0, False, rank == 0]] * 3, rank
    single = LELPProjector(3, method="exact").fit(h, y, head_weight=w, head_bias=b, chunk_bytes=CHUNK_BYTES)
    got = LELPProjector.load(tmp_path / "ddp.safetensors")
    torch.testing.assert_close(got.A, single.A, atol=1e-6, rtol=0)
    targets = TargetsDataset(str(tmp_path / "targets"))
    assert len(targets) == len(h)
    torch.testing.assert_close(targets.targets(range(len(h))), got.targets(h, backend="torch"), atol=1e-5, rtol=1e-5)
    # the KD store's shards shared by the ranks (until session 58 each rank wrote the whole store, and said so)
    kd = json.loads((tmp_path / "kd" / "manifest.json").read_text())
    assert kd["n_rows"] == len(h) and len(kd["shards"]) == 10
