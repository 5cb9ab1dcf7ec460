"""Offline target generation: formats, resume after SIGKILL, 2 ranks under torchrun, bad input, dataset."""

import errno
import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import xxhash
from torch.utils.data import DataLoader, TensorDataset

from lelp_fast import LELPProjector, TargetsDataset, collate_with_targets, generate_targets, reference
from lelp_fast.io import ArraySource
from lelp_fast.offline import shards
from conftest import make_problem

D = 24
CHUNK = D * 4 * 97  # 97 fp32 rows per chunk and shard: 5 shards for 450 rows, the last one short
TOL = {"float32": (1e-5, 1e-5), "float16": (2e-2, 2e-3), "bfloat16": (1e-1, 1e-2)}


@pytest.fixture(scope="module")
def problem():
    h, w, b, y = make_problem(n=450, d=D, num_classes=3, seed=61)
    projector = LELPProjector(4, beta=0.7, tau=1.3).fit(h, y, head_weight=w, head_bias=b)
    return h.float(), y, projector


def _tree(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "parquet"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_format_and_dtype_matches_the_reference(problem, tmp_path, fmt, dtype):
    h, _, projector = problem
    if fmt == "parquet" and dtype == "bfloat16":
        with pytest.raises(ValueError, match="Parquet has no bfloat16"):
            generate_targets(projector, h, str(tmp_path), format=fmt, dtype=dtype)
        return
    manifest = generate_targets(projector, h, str(tmp_path), format=fmt, dtype=dtype, chunk_bytes=CHUNK)
    assert manifest["n_rows"] == 450 and len(manifest["shards"]) == 5 and manifest["shards"][-1]["rows"] == [388, 450]
    for entry in manifest["shards"]:
        for info in entry["files"].values():
            data = (tmp_path / info["file"]).read_bytes()
            assert info["sha256"] == hashlib.sha256(data).hexdigest()
            assert info["xxh3_128"] == xxhash.xxh3_128_hexdigest(data)
    got = TargetsDataset(str(tmp_path), verify=True).targets(range(450))
    assert got.dtype == shards.DTYPES[dtype]
    want = projector.targets(h.double(), out_dtype=torch.float64, backend="torch")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    assert not list(tmp_path.glob(".tmp*")) and not list(tmp_path.glob("progress-*"))


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "parquet"])
def test_compact_form_chooses_beta_and_tau_at_training_time(problem, tmp_path, fmt):
    h, _, projector = problem
    generate_targets(projector, h, str(tmp_path), format=fmt, dtype="float32", compact=True, chunk_bytes=CHUNK)
    ds = TargetsDataset(str(tmp_path), beta=0.2, tau=3.0)
    want = projector.targets(h.double(), beta=0.2, tau=3.0, out_dtype=torch.float64, backend="torch")
    torch.testing.assert_close(ds.targets([449, 0, 200, 97]).double(), want[[449, 0, 200, 97]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="stored compact .*pass beta and tau"):
        TargetsDataset(str(tmp_path), beta=0.2)
    with pytest.raises(ValueError, match="stored compact .*pass beta and tau to read targets"):
        TargetsDataset(str(tmp_path)).targets([0])
    assert TargetsDataset(str(tmp_path)).to_hf_dataset().num_rows == h.shape[0]  # the stored fields need neither


def test_outputs_are_deterministic_and_a_finished_run_is_not_redone(problem, tmp_path):
    h, _, projector = problem
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    generate_targets(projector, h, a, chunk_bytes=CHUNK)
    generate_targets(projector, ArraySource(h), b, chunk_bytes=CHUNK)
    assert _tree(a) == _tree(b)
    before = os.stat(os.path.join(a, "shard-000000.log_targets.npy")).st_mtime_ns
    generate_targets(projector, h, a, chunk_bytes=CHUNK)
    assert os.stat(os.path.join(a, "shard-000000.log_targets.npy")).st_mtime_ns == before


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lelp_fast import LELPProjector, generate_targets
    from slow_source import SlowSource

    g = torch.Generator().manual_seed(0)
    h = torch.randn(4000, 16, generator=g)
    projector = LELPProjector.load(sys.argv[1])
    generate_targets(projector, SlowSource(h, name="slow", delay=0.05), sys.argv[2], format=sys.argv[3], chunk_bytes=16 * 4 * 100)
    """
)


def _kill_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4000, 16, generator=g)


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_sigkill_at_any_moment_then_rerun_gives_identical_bytes(tmp_path, fmt):
    h = _kill_data()
    head_w, head_b = torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(2)
    y = (h @ head_w.T).argmax(1)
    projector = LELPProjector(3).fit(h, y, head_weight=head_w, head_bias=head_b)
    proj_path = str(tmp_path / "p.safetensors")
    projector.save(proj_path)
    out = str(tmp_path / "out")
    here = os.path.dirname(os.path.abspath(__file__))  # not the source tree: use the installed package
    progress = os.path.join(out, "progress-rank0.json")

    def recorded():
        return len(json.loads(open(progress).read())["shards"]) if os.path.exists(progress) else 0

    def run_and_kill(when):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, proj_path, out, fmt], cwd=here)
        deadline = time.time() + 60
        while not when() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    start = time.time()
    run_and_kill(lambda: time.time() - start > 0.3)  # while importing: nothing written yet
    run_and_kill(lambda: recorded() >= 1)  # right after the first shard was recorded
    n = recorded()
    run_and_kill(lambda: recorded() >= n + 3)  # a few shards later
    n = recorded()
    t0 = [None]

    def mid_shard():  # 20 ms after a shard was recorded: in the middle of the next one
        if recorded() > n and t0[0] is None:
            t0[0] = time.time()
        return t0[0] is not None and time.time() - t0[0] > 0.02

    run_and_kill(mid_shard)
    assert 0 < recorded() < 40 and not os.path.exists(os.path.join(out, "manifest.json"))
    rc = subprocess.call([sys.executable, "-c", KILL_SCRIPT, proj_path, out, fmt], cwd=here)
    assert rc == 0
    clean = str(tmp_path / "clean")
    generate_targets(projector, ArraySource(h, name="slow"), clean, format=fmt, chunk_bytes=16 * 4 * 100)
    assert _tree(out) == _tree(clean)


def test_two_ranks_under_torchrun_equal_one_process(problem, tmp_path):
    h, _, projector = problem
    np.save(tmp_path / "h.npy", h.numpy())
    projector.save(str(tmp_path / "p.safetensors"))
    args = ["targets", "--projector", str(tmp_path / "p.safetensors"), "--embeddings", str(tmp_path / "h.npy"),
            "--chunk-mb", str(CHUNK / (1 << 20)), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                    "-m", "lelp_fast", *args, "--out", str(tmp_path / "two")], check=True, env=env,
                   cwd=str(tmp_path), timeout=300)
    subprocess.run([sys.executable, "-m", "lelp_fast", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   cwd=str(tmp_path), timeout=300)
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one")
    assert len(json.loads(_tree(tmp_path / "one")["manifest.json"])["shards"]) == 5


def test_bad_rows_are_named_when_the_targets_op_does_not_check(problem, tmp_path, monkeypatch):
    """On a GPU the targets op checks nothing (a sync a step, issue 21 item 5); the pipeline, whose
    rows come back to the host anyway, names the bad row itself instead of writing NaN targets."""
    import lelp_fast.projector as projector_module
    from lelp_fast.offline import pipeline

    unchecked = projector_module.lelp_targets
    monkeypatch.setattr(projector_module, "lelp_targets",
                        lambda *args, **kwargs: unchecked(*args, **kwargs, check_inputs=False))
    monkeypatch.setattr(pipeline, "_targets_op_checks", lambda h: False)  # as for GPU tensors
    h, _, projector = problem
    bad = h.clone()
    bad[300, 3] = float("nan")
    with pytest.raises(ValueError, match="embeddings row 300 contains NaN or Inf"):
        generate_targets(projector, bad, str(tmp_path / "nan"), chunk_bytes=CHUNK)
    z = torch.nn.functional.linear(h, projector.head_weight, projector.head_bias)  # the teacher's logits
    z[305, 1] = float("inf")
    with pytest.raises(ValueError, match="teacher_logits row 305 contains NaN or Inf"):
        generate_targets(projector, ArraySource(h, teacher_logits=z), str(tmp_path / "nanz"), chunk_bytes=CHUNK)
    big = h.clone()
    big[301] = 3e38
    with pytest.raises(ValueError, match="embeddings row 301 is finite but its targets are not"):
        generate_targets(projector, big, str(tmp_path / "big"), chunk_bytes=CHUNK)


def test_bad_input_gives_clear_errors(problem, tmp_path):
    h, _, projector = problem
    bad = h.clone()
    bad[300, 3] = float("nan")
    for compact in (False, True):
        with pytest.raises(ValueError, match="embeddings row 300 contains NaN or Inf"):
            generate_targets(projector, bad, str(tmp_path / f"nan{compact}"), chunk_bytes=CHUNK, compact=compact)
    z = torch.nn.functional.linear(h, projector.head_weight, projector.head_bias)  # the teacher's logits
    z[5, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits row 5 contains NaN or Inf"):
        generate_targets(projector, ArraySource(h, teacher_logits=z), str(tmp_path / "nanz"), chunk_bytes=CHUNK)
    with pytest.raises(ValueError, match="the source has d=23 but the projector was fitted with d=24"):
        generate_targets(projector, h[:, :23].contiguous(), str(tmp_path / "d"))
    z = torch.randn(450, 2)
    with pytest.raises(ValueError, match=r"teacher logits have shape \(450, 2\), expected \(450, 3\)"):
        generate_targets(projector, ArraySource(h, teacher_logits=z), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="teacher_logits has 449 rows but embeddings has 450"):
        generate_targets(projector, ArraySource(h, teacher_logits=z[:449]), str(tmp_path / "rows"))
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError, match="output directory .* is not writable"):
        generate_targets(projector, h, str(tmp_path / "file" / "out"))
    with pytest.raises(ValueError, match="format must be one of"):
        generate_targets(projector, h, str(tmp_path / "f"), format="csv")


def test_changed_source_and_corrupt_shards_are_refused(problem, tmp_path):
    h, _, projector = problem
    path = tmp_path / "h.npy"
    np.save(path, h.numpy())
    out = str(tmp_path / "out")
    generate_targets(projector, str(path), out, chunk_bytes=CHUNK)
    with pytest.raises(ValueError, match="written with other settings .*dtype"):
        generate_targets(projector, str(path), out, chunk_bytes=CHUNK, dtype="float32")
    changed = h.clone()
    changed[0] += 1
    np.save(path, changed.numpy())
    with pytest.raises(ValueError, match="the source changed since these targets were written"):
        generate_targets(projector, str(path), out, chunk_bytes=CHUNK)

    # A partial run whose recorded shard was truncated afterwards: named, not silently reused.
    partial = str(tmp_path / "partial")
    generate_targets(projector, h, partial, chunk_bytes=CHUNK)
    manifest = json.loads(open(os.path.join(partial, "manifest.json")).read())
    progress = {"kind": manifest["kind"], "version": manifest["version"], "settings": manifest["settings"],
                "shards": manifest["shards"][:2]}
    os.unlink(os.path.join(partial, "manifest.json"))
    with open(os.path.join(partial, "progress-rank0.json"), "w") as f:
        json.dump(progress, f)
    shard = os.path.join(partial, "shard-000001.log_targets.npy")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 8)
    with pytest.raises(ValueError, match="shard-000001.log_targets.npy is truncated or corrupt"):
        generate_targets(projector, h, partial, chunk_bytes=CHUNK)
    with pytest.raises(ValueError, match="has no manifest.json: the targets run did not finish"):
        TargetsDataset(partial)


def test_other_teacher_logits_or_labels_are_a_changed_source(problem, tmp_path):
    """The fingerprint a manifest (and a fit's checkpoint) keeps of its source covers the teacher logits
    and labels given with the embeddings. Until session 58 it covered the embeddings only, so targets
    rerun into a finished directory with other teacher logits were kept as they were, silently."""
    from safetensors.torch import save_file

    from lelp_fast.io import NpySource, SafetensorsSource

    h, y, projector = problem
    # the teacher's logits (its head applied to h: the projector holds a source to them), and another
    # teacher's close enough to pass that check, whose bytes differ
    z = torch.nn.functional.linear(h, projector.head_weight, projector.head_bias)
    paths = {name: str(tmp_path / f"{name}.npy") for name in ("h", "z", "other_z", "y", "other_y")}
    for name, arr in (("h", h), ("z", z), ("other_z", z * 1.001), ("y", y), ("other_y", y.flip(0))):
        np.save(paths[name], arr.numpy())
    out = str(tmp_path / "out")
    generate_targets(projector, NpySource(paths["h"], teacher_logits=paths["z"]), out, chunk_bytes=CHUNK)
    generate_targets(projector, NpySource(paths["h"], teacher_logits=paths["z"]), out, chunk_bytes=CHUNK)  # the same
    for other in (NpySource(paths["h"], teacher_logits=paths["other_z"]), NpySource(paths["h"])):
        with pytest.raises(ValueError, match="the source changed since these targets were written"):
            generate_targets(projector, other, out, chunk_bytes=CHUNK)

    in_memory = {ArraySource(h, teacher_logits=logits).fingerprint() for logits in (z, z.flip(0), None)}
    assert len(in_memory) == 3
    # the KD store's source: its logits are its embeddings, hashed once (its stores of before still match)
    assert ArraySource(z, None, z).fingerprint() == ArraySource(z).fingerprint()
    assert ArraySource(h, teacher_logits=np.load(paths["z"])).fingerprint() == ArraySource(
        h, teacher_logits=np.load(paths["z"], mmap_mode="r")).fingerprint()
    labelled = {NpySource(paths["h"], labels).fingerprint() for labels in (paths["y"], paths["other_y"], paths["y"])}
    assert len(labelled) == 2
    stored = str(tmp_path / "h.safetensors")
    save_file({"embeddings": h.contiguous(), "teacher_logits": z, "logits_b": z.flip(0).contiguous()}, stored)
    found = {SafetensorsSource(stored).fingerprint(), SafetensorsSource(stored, logits_key="logits_b").fingerprint(),
             SafetensorsSource(stored, teacher_logits=z.numpy()).fingerprint(),
             SafetensorsSource(stored, teacher_logits=z.flip(0).numpy()).fingerprint()}
    assert len(found) == 4


def test_a_run_that_fails_before_writing_leaves_no_directory_it_made(problem, tmp_path):
    """Until session 58 a run refused at its first chunk (a NaN row here; a backend not on this machine
    in a user's report) left an empty output directory behind. One the user made is kept, as is
    everything a partial run wrote."""
    h, _, projector = problem
    bad = h.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="row 3"):
        generate_targets(projector, bad, str(tmp_path / "new"), chunk_bytes=CHUNK)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="row 3"):
        generate_targets(projector, bad, str(tmp_path / "mine"), chunk_bytes=CHUNK)
    assert (tmp_path / "mine").is_dir()
    late = h.clone()
    late[-1, 0] = float("nan")  # the last chunk's: the shards before it are kept, to resume from
    with pytest.raises(ValueError, match=f"row {len(h) - 1}"):
        generate_targets(projector, late, str(tmp_path / "partial"), chunk_bytes=CHUNK)
    assert any(name.startswith("shard-") for name in os.listdir(tmp_path / "partial"))


def test_disk_full_leaves_nothing_half_written(problem, tmp_path, monkeypatch):
    h, _, projector = problem
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync_fails_on_third_file(fd):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(shards.os, "fsync", fsync_fails_on_third_file)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full while writing .*shard-000001"):
        generate_targets(projector, h, str(out), chunk_bytes=CHUNK)
    assert not list(out.glob(".tmp*")) and not (out / "manifest.json").exists()
    recorded = json.loads((out / "progress-rank0.json").read_text())["shards"]
    assert [e["index"] for e in recorded] == [0]  # only the shard that was fully written counts
    monkeypatch.setattr(shards.os, "fsync", real_fsync)
    generate_targets(projector, h, str(out), chunk_bytes=CHUNK)  # rerun completes it
    clean = tmp_path / "clean"
    generate_targets(projector, h, str(clean), chunk_bytes=CHUNK)
    assert _tree(out) == _tree(clean)


def test_dataset_joins_rows_and_feeds_a_dataloader(problem, tmp_path):
    h, y, projector = problem
    generate_targets(projector, h, str(tmp_path), chunk_bytes=CHUNK, dtype="float32")
    x = torch.randn(450, 5)
    ds = TargetsDataset(str(tmp_path), TensorDataset(x, y))
    (xi, yi), t = ds[123]
    assert torch.equal(xi, x[123]) and yi == y[123]
    torch.testing.assert_close(t, projector.targets(h[123:124])[0], atol=1e-5, rtol=1e-5)
    loader = DataLoader(ds, batch_size=64, shuffle=True, collate_fn=collate_with_targets,
                        generator=torch.Generator().manual_seed(0))
    seen = 0
    for (xb, yb), tb in loader:
        rows = torch.nonzero((x.unsqueeze(0) == xb.unsqueeze(1)).all(-1))[:, 1]  # recover the row numbers
        torch.testing.assert_close(tb, ds.targets(rows.tolist()))
        seen += xb.shape[0]
    assert seen == 450
    assert ds._cache and pickle.loads(pickle.dumps(ds))._cache == {}  # workers get paths, not mapped shards
    workers = DataLoader(ds, batch_size=100, num_workers=2, collate_fn=collate_with_targets)
    torch.testing.assert_close(torch.cat([tb for _, tb in workers]), ds.targets(range(450)))
    with pytest.raises(ValueError, match="dataset has 449 rows but the targets .* have 450"):
        TargetsDataset(str(tmp_path), TensorDataset(x[:449]))
    with pytest.raises(IndexError, match="out of range"):
        ds.targets([450])


def test_example_training_loops_run(tmp_path):
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                           "train_from_targets.py")
    out = subprocess.run([sys.executable, example, "--epochs", "2", "--work-dir", str(tmp_path)], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    assert "offline targets: student accuracy" in out and "online targets: student accuracy" in out


def test_resume_with_another_world_size_keeps_the_other_ranks_shards(problem, tmp_path, monkeypatch):
    from lelp_fast.offline import pipeline

    h, _, projector = problem
    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "rank_world", lambda group: (1, 3))  # rank 1 of 3 ran, then the job died
    assert generate_targets(projector, h, str(out), chunk_bytes=CHUNK) is None
    recorded = json.loads((out / "progress-rank1.json").read_text())["shards"]
    assert [e["index"] for e in recorded] == [1, 4]
    monkeypatch.undo()
    written = os.stat(out / "shard-000004.log_targets.npy").st_mtime_ns
    generate_targets(projector, h, str(out), chunk_bytes=CHUNK)  # now one process: shards 1 and 4 are kept
    assert os.stat(out / "shard-000004.log_targets.npy").st_mtime_ns == written
    clean = tmp_path / "clean"
    generate_targets(projector, h, str(clean), chunk_bytes=CHUNK)
    assert _tree(out) == _tree(clean)


HOLD_LOCK = """
import sys, time
from lelp_fast.io.locks import ExclusiveLock
ExclusiveLock(sys.argv[1], "test").acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_one_output_is_refused_and_a_dead_holders_lock_is_taken_over(problem, tmp_path):
    """Two runs on one --out ended 'complete' with mixed shards; now the second fails at once, naming
    the holder, and a lock left by a killed run does not block the next one."""
    import signal

    h, _, projector = problem
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock-rank0")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(RuntimeError, match=rf"output directory .*out is in use by another run \(pid {holder.pid}"):
            generate_targets(projector, h, str(out), chunk_bytes=CHUNK)
        assert not any(name.startswith("shard-") for name in os.listdir(out))  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    clean = str(tmp_path / "clean")
    generate_targets(projector, h, str(out), chunk_bytes=CHUNK)  # the dead holder's lock is free
    generate_targets(projector, h, clean, chunk_bytes=CHUNK)
    assert _tree(str(out)) == _tree(clean)


def test_rerun_over_a_finished_directory_repairs_damaged_shards(problem, tmp_path):
    """A flipped byte in one shard and another shard deleted: the rerun reported 'wrote' over them."""
    h, _, projector = problem
    out, clean = str(tmp_path / "out"), str(tmp_path / "clean")
    generate_targets(projector, h, out, chunk_bytes=CHUNK)
    generate_targets(projector, h, clean, chunk_bytes=CHUNK)
    flipped = os.path.join(out, "shard-000002.log_targets.npy")
    raw = bytearray(open(flipped, "rb").read())
    raw[-7] ^= 0x01
    open(flipped, "wb").write(bytes(raw))
    os.unlink(os.path.join(out, "shard-000004.log_targets.npy"))
    with pytest.warns(RuntimeWarning, match="2 shard\\(s\\) missing or corrupt"):
        generate_targets(projector, h, out, chunk_bytes=CHUNK)
    assert _tree(out) == _tree(clean)
    TargetsDataset(out)  # loads and verifies


def test_outputs_follow_the_umask(problem, tmp_path):
    import stat

    h, _, projector = problem
    old = os.umask(0o022)
    try:
        generate_targets(projector, h, str(tmp_path / "out"), chunk_bytes=CHUNK)
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) for name in os.listdir(tmp_path / "out")}
    assert modes == {0o644}


def test_dataset_names_a_mistyped_path_and_a_truncated_shard(problem, tmp_path):
    h, _, projector = problem
    out = str(tmp_path / "out")
    generate_targets(projector, h, out, chunk_bytes=CHUNK)
    with pytest.raises(FileNotFoundError, match="targets directory .*outx does not exist"):
        TargetsDataset(out + "x")
    shard = os.path.join(out, "shard-000001.log_targets.npy")
    os.truncate(shard, os.path.getsize(shard) - 10)
    with pytest.raises(ValueError, match="shard-000001.log_targets.npy is truncated or corrupt"):
        TargetsDataset(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("compact", [False, True])
def test_gpu_run_matches_the_reference(problem, tmp_path, compact):
    """device="cuda": chunks staged through reused pinned buffers one ahead; same shards as the CPU run."""
    h, _, projector = problem
    kw = dict(format="npy", dtype="float32", compact=compact, chunk_bytes=CHUNK)
    generate_targets(projector, h, str(tmp_path / "gpu"), device="cuda", **kw)
    generate_targets(projector, h, str(tmp_path / "cpu"), **kw)
    extra = dict(beta=0.7, tau=1.3) if compact else {}
    got = TargetsDataset(str(tmp_path / "gpu"), verify=True, **extra).targets(range(450))
    want = projector.targets(h.double(), out_dtype=torch.float64, backend="torch")
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    cpu = TargetsDataset(str(tmp_path / "cpu"), **extra).targets(range(450))
    torch.testing.assert_close(got, cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "parquet"])
def test_a_flipped_byte_in_a_targets_shard_is_refused_where_it_is_read(problem, tmp_path, fmt):
    from lelp_fast.train import TrainSettings, distill

    h, y, projector = problem
    out = str(tmp_path / "targets")
    manifest = generate_targets(projector, h, out, format=fmt, chunk_bytes=CHUNK)
    clean = TargetsDataset(out).targets(range(450))
    name = next(iter(manifest["shards"][2]["files"].values()))["file"]
    path = os.path.join(out, name)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # same size: only a checksum can tell (the last byte is a target value in npy)
        at = size - 1 if fmt != "parquet" else size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ValueError, match=f"{name} is corrupt: its xxh3_128 checksum does not match") as caught:
        TargetsDataset(out).targets(range(450))
    assert "\n" not in str(caught.value) and path in str(caught.value)
    torch.testing.assert_close(TargetsDataset(out).targets(range(97)), clean[:97])  # the other shards still read
    with pytest.raises(ValueError, match=f"{name} is corrupt"):
        distill(torch.nn.Linear(D, 12), TensorDataset(h, y), out, str(tmp_path / "train"), num_classes=3,
                n_subclasses=4, settings=TrainSettings(epochs=1, batch_size=64, tensorboard=False))
    if fmt == "npy":  # the explicit opt-out reads the file unchecked
        unchecked = TargetsDataset(out, verify=False).targets(range(450))
        assert not torch.equal(unchecked, clean)


@pytest.mark.parametrize("dtype,compact", [("float16", False), ("bfloat16", False), ("float32", True)])
def test_targets_read_into_memory_serve_the_same_batches(problem, tmp_path, dtype, compact):
    """distill reads stores up to 1 GiB into one tensor: every batch equals the mapped shards' (any
    dtype, compact targets computed on read), a store over the budget stays mapped, and a flipped
    byte is refused by the read (the checksum is still verified)."""
    h, y, projector = problem
    generate_targets(projector, h, str(tmp_path), chunk_bytes=CHUNK, dtype=dtype, compact=compact)
    temps = dict(beta=0.5, tau=1.0) if compact else {}
    mapped, loaded = TargetsDataset(str(tmp_path), **temps), TargetsDataset(str(tmp_path), **temps)
    assert not loaded.read_into_memory(max_bytes=100) and loaded._in_memory is None
    assert loaded.read_into_memory()
    for rows in ([449, -1, 0, 5, 5, 200, 97, 96], torch.randperm(450)[:64], []):
        assert torch.equal(loaded.targets(rows), mapped.targets(rows))
    manifest = json.load(open(os.path.join(str(tmp_path), "manifest.json")))
    first = next(iter(manifest["shards"][1]["files"].values()))["file"]
    path = os.path.join(str(tmp_path), first)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        TargetsDataset(str(tmp_path), **temps).read_into_memory()


def test_batches_are_gathered_and_equal_the_rows_of_a_dataloader(problem, tmp_path):
    from lelp_fast.offline import batch_loader

    h, y, projector = problem
    generate_targets(projector, h, str(tmp_path), chunk_bytes=CHUNK, dtype="float16")
    x = torch.randn(450, 5)
    for inputs in (TensorDataset(x, y), x, [(x[i], y[i]) for i in range(450)]):  # tensors, a tensor, any dataset
        ds = TargetsDataset(str(tmp_path), inputs)
        rows = DataLoader(ds, batch_size=64, shuffle=True, collate_fn=collate_with_targets,
                          generator=torch.Generator().manual_seed(3))
        gathered = batch_loader(ds, 64, shuffle=True, generator=torch.Generator().manual_seed(3))
        assert len(gathered) == len(rows) == 8
        for (a_in, a_t), (b_in, b_t) in zip(rows, gathered):
            assert torch.equal(a_t, b_t) and a_t.dtype == torch.float16
            for a, b in zip(a_in if isinstance(inputs, (TensorDataset, list)) else [a_in],
                            b_in if isinstance(inputs, (TensorDataset, list)) else [b_in]):
                assert torch.equal(a, b)
    ds = TargetsDataset(str(tmp_path), TensorDataset(x, y))
    for drop_last in (False, True):  # no generator: both draw the permutation's seed from the global RNG
        torch.manual_seed(11)
        rows = list(DataLoader(ds, batch_size=64, shuffle=True, drop_last=drop_last, collate_fn=collate_with_targets))
        after_rows = torch.rand(3)
        torch.manual_seed(11)
        gathered = list(batch_loader(ds, 64, shuffle=True, drop_last=drop_last))
        assert torch.equal(torch.rand(3), after_rows) and len(gathered) == len(rows) == 8 - drop_last
        for ((a_x, a_y), a_t), ((b_x, b_y), b_t) in zip(rows, gathered):
            assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y) and torch.equal(a_t, b_t)
    for n_rows, drop_last in ((450, False), (450, True), (448, True)):  # a reused generator: every epoch equal
        sub = torch.utils.data.Subset(ds, range(n_rows))
        sub.batch = lambda rows: ds.batch(rows)
        g_rows, g_ours = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        rows = DataLoader(sub, batch_size=64, shuffle=True, drop_last=drop_last, generator=g_rows,
                          collate_fn=collate_with_targets)
        ours = batch_loader(sub, 64, shuffle=True, drop_last=drop_last, generator=g_ours)
        for epoch in range(3):
            for (a, a_t), (b, b_t) in zip(rows, ours, strict=True):
                assert torch.equal(a[0], b[0]) and torch.equal(a_t, b_t), (n_rows, drop_last, epoch)
            assert torch.equal(g_rows.get_state(), g_ours.get_state())
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            batch_loader(ds, bad)
    from lelp_fast.offline.dataset import GatheredBatches  # distill's loader: batch_loader's batches, no DataLoader

    for generator in (torch.Generator().manual_seed(7), None):
        torch.manual_seed(13)
        want = list(batch_loader(ds, 64, shuffle=True, generator=generator))
        after, state = torch.rand(2), generator.get_state() if generator else None
        torch.manual_seed(13)
        generator = generator.manual_seed(7) if generator else None
        got = GatheredBatches(ds, 64, shuffle=True, generator=generator)
        assert len(got) == len(want) == 8
        for ((a_x, a_y), a_t), ((b_x, b_y), b_t) in zip(want, got, strict=True):
            assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y) and torch.equal(a_t, b_t)
        assert torch.equal(torch.rand(2), after) and (state is None or torch.equal(generator.get_state(), state))
    want = projector.targets(h.double(), out_dtype=torch.float64, backend="torch")
    assert ds.targets([]).shape == (0, want.shape[1]) and ds.targets([]).dtype == torch.float16
    rows = [449, -1, 0, -450, 5, 5, 200, 97, 96]  # across shards, unordered, negative, repeated
    torch.testing.assert_close(ds.targets(rows).double(), want[[r % 450 for r in rows]], atol=2e-2, rtol=2e-3)
    got = torch.cat(list(batch_loader(TargetsDataset(str(tmp_path)), 100)))  # no dataset: targets only, in order
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("fmt,dtype,compact", [("npy", "float16", False), ("safetensors", "bfloat16", False),
                                               ("parquet", "float32", False), ("npy", "float32", True)])
def test_targets_open_as_a_hf_dataset_viewing_the_mapped_shards(problem, tmp_path, fmt, dtype, compact):
    pytest.importorskip("datasets", reason="datasets is not installed (pip install 'lelp_fast[datasets]')")
    h, _, projector = problem
    generate_targets(projector, h, str(tmp_path), format=fmt, dtype=dtype, compact=compact, chunk_bytes=CHUNK)
    store = TargetsDataset(str(tmp_path), **({"beta": 0.7, "tau": 1.3} if compact else {}))
    ds = store.to_hf_dataset()
    assert ds.num_rows == 450 and ds.column_names == (["u", "teacher_logits"] if compact else ["log_targets"])
    rows = ds.with_format("torch", dtype=torch.float64)[:]
    if compact:  # the stored fields, and the targets rebuilt from them equal the fp64 reference
        got = reference.log_targets(rows["u"], rows["teacher_logits"], 4, 0.7, 1.3)
    else:
        got = rows["log_targets"]
    want = projector.targets(h.double(), beta=0.7, tau=1.3, out_dtype=torch.float64, backend="torch")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if fmt != "parquet" and dtype != "bfloat16":  # no copy: Arrow's buffer is the mapped file's memory
        first = ds.data.table.column(ds.column_names[0]).chunk(0).values.buffers()[1].address
        assert first == store._shard(0)[ds.column_names[0]].data_ptr()


def test_hf_dataset_of_a_corrupt_store_names_the_file(problem, tmp_path):
    pytest.importorskip("datasets", reason="datasets is not installed")
    h, _, projector = problem
    generate_targets(projector, h, str(tmp_path), chunk_bytes=CHUNK)
    path = tmp_path / "shard-000004.log_targets.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-000004.log_targets.npy is corrupt"):
        TargetsDataset(str(tmp_path)).to_hf_dataset()


def test_each_shard_is_hashed_once_even_when_its_mapping_is_dropped(problem, tmp_path, monkeypatch):
    from lelp_fast.io import mapped
    from lelp_fast.offline import dataset as dataset_module

    h, _, projector = problem
    generate_targets(projector, h, str(tmp_path), chunk_bytes=CHUNK, dtype="float32")
    hashed = []
    real = mapped.map_file
    monkeypatch.setattr(mapped, "map_file", lambda path, checksums=None, hint="": (
        hashed.append(os.path.basename(path)) if checksums else None) or real(path, checksums, hint))
    monkeypatch.setitem(dataset_module.MAX_OPEN, "npy", 1)  # every batch below re-maps shards
    ds = TargetsDataset(str(tmp_path))
    want = projector.targets(h.double(), out_dtype=torch.float64, backend="torch")
    for rows in (range(450), range(449, -1, -1), [0, 449, 100, 300]):
        torch.testing.assert_close(ds.targets(list(rows)).double(), want[list(rows)], atol=1e-5, rtol=1e-5)
    assert sorted(hashed) == [f"shard-{i:06d}.log_targets.npy" for i in range(5)]


def test_gpu_chunk_check_names_the_logits_of_vanilla_kd_targets():
    """On a GPU chunk the targets op checks nothing and the pipeline names the bad input row from the
    NaN targets: for vanilla KD (S = 1, given logits) an overflow of z / τ is the logits' row, not the
    embeddings' projection (which those targets do not depend on)."""
    from lelp_fast.offline import pipeline

    h, z = torch.randn(6, 4), torch.randn(6, 3)
    log_t = torch.log_softmax(z, 1)
    log_t[3] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits row 103 is finite but its targets are not"):
        pipeline._check_target_rows(log_t, h, z, 100, vanilla_kd=True)
    with pytest.raises(ValueError, match="embeddings row 103 is finite but its targets are not"):
        pipeline._check_target_rows(log_t, h, z, 100, vanilla_kd=False)


def test_an_edited_in_memory_array_is_a_changed_source(problem, tmp_path):
    """An array or tensor given in memory was fingerprinted by three of its rows (0, n/2, n - 1): an
    edit anywhere else, or to its labels or logits, kept the finished targets of the old rows as
    they were, silently (a session-64 walkthrough: row 100 of the targets 56.8 off the projector's).
    Every byte of an in-memory source now counts; a .npy file keeps its sampled rows, size and
    modification time (no read of the whole file to fingerprint it)."""
    from lelp_fast.io import NpySource

    h, y, projector = problem
    out = str(tmp_path / "out")
    generate_targets(projector, h.numpy(), out, chunk_bytes=CHUNK)
    generate_targets(projector, h.numpy().copy(), out, chunk_bytes=CHUNK)  # the same bytes: kept
    edited = h.clone()
    edited[100, 3] += 5.0
    for other in (edited, edited.numpy(), ArraySource(h, y.clone().index_fill_(0, torch.tensor([7]), 0))):
        with pytest.raises(ValueError, match="the source changed since these targets were written"):
            generate_targets(projector, other, out, chunk_bytes=CHUNK)
    assert ArraySource(h.bfloat16()).fingerprint() != ArraySource(edited.bfloat16()).fingerprint()
    path = str(tmp_path / "h.npy")
    np.save(path, h.numpy())
    read = []
    source = NpySource(path)
    source.embeddings = _Recording(source.embeddings, read)
    source.fingerprint()
    assert len(read) <= 3, read  # the sampled rows only


def test_labels_or_logits_edited_in_memory_beside_a_file_are_a_changed_source(problem, tmp_path):
    """Labels or teacher logits given as arrays beside a .npy or safetensors file of embeddings were
    fingerprinted by three rows: an edit to any other row (a relabelled row) kept the finished targets
    and fit checkpoints of the old ones, silently. Such arrays now count by every byte; the file's
    own fingerprint (sampled rows, size, modification time) is as before."""
    from safetensors.numpy import save_file as save_numpy

    from lelp_fast.io import NpySource, SafetensorsSource

    h, y, projector = problem
    z = torch.nn.functional.linear(h, projector.head_weight, projector.head_bias)  # the teacher's own logits
    path = str(tmp_path / "h.npy")
    np.save(path, h.numpy())
    out = str(tmp_path / "out")
    generate_targets(projector, NpySource(path, teacher_logits=z.numpy()), out, chunk_bytes=CHUNK)
    generate_targets(projector, NpySource(path, teacher_logits=z.numpy().copy()), out, chunk_bytes=CHUNK)  # kept
    edited = z.clone()
    edited[100, 1] += 0.01  # not a sampled row (0, n/2, n - 1); within the same-teacher check
    with pytest.raises(ValueError, match="the source changed since these targets were written"):
        generate_targets(projector, NpySource(path, teacher_logits=edited.numpy()), out, chunk_bytes=CHUNK)
    relabelled = y.clone()
    relabelled[7] = 1 - relabelled[7]
    assert NpySource(path, y.numpy()).fingerprint() != NpySource(path, relabelled.numpy()).fingerprint()
    stored = str(tmp_path / "h.safetensors")
    save_numpy({"embeddings": h.numpy()}, stored)
    assert SafetensorsSource(stored, labels=y.numpy()).fingerprint() != SafetensorsSource(
        stored, labels=relabelled.numpy()).fingerprint()
    assert SafetensorsSource(stored, teacher_logits=z.numpy()).fingerprint() != SafetensorsSource(
        stored, teacher_logits=edited.numpy()).fingerprint()


class _Recording:
    """An array whose row reads are recorded (slices as (start, stop))."""

    def __init__(self, arr, read):
        self._arr, self._read = arr, read

    def __getattr__(self, name):
        return getattr(self._arr, name)

    def __len__(self):
        return len(self._arr)

    def __getitem__(self, index):
        self._read.append((index.start, index.stop) if isinstance(index, slice) else index)
        return self._arr[index]


@pytest.mark.skipif(torch.cuda.is_available(), reason="names a CUDA device this machine lacks")
def test_a_cuda_device_on_a_machine_without_one_is_named(problem, tmp_path):
    """generate_targets(device="cuda") failed inside torch ("torch.cuda.Stream requires CUDA
    support"), capture with an AssertionError ("Torch not compiled with CUDA enabled"); both now
    name the argument, as the fit did."""
    from torch import nn

    from lelp_fast.capture import capture

    h, y, projector = problem
    with pytest.raises(ValueError, match=r"^device is 'cuda:0', but torch.cuda.is_available\(\) is False"):
        generate_targets(projector, h, str(tmp_path / "out"), device="cuda:0")
    loader = DataLoader(TensorDataset(h, y), batch_size=64)
    with pytest.raises(ValueError, match=r"^device is 'cuda', but torch.cuda.is_available\(\) is False"):
        capture(nn.Sequential(nn.Linear(h.shape[1], 4), nn.Linear(4, 3)), loader, str(tmp_path / "cap"),
                device="cuda")
    with pytest.raises(ValueError, match=r"^device is 'cuda', but"):
        LELPProjector(2).fit(h, y, device="cuda")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "cap")


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "parquet"])
def test_a_dataset_in_another_order_than_its_targets_is_refused(problem, tmp_path, fmt):
    """Targets hold no labels, so a training set shuffled or filtered after the targets were written
    trained every row on another row's targets without a word (a session-65 walkthrough: test
    accuracy 0.47, below chance, against 0.82). Targets written from a source with labels now store
    them (int16, 2 bytes a row), and a dataset joined to them whose labels differ is refused, naming
    the row; rows without a label on either side (-100) are not compared."""
    h, y, projector = problem
    out = str(tmp_path / "t")
    generate_targets(projector, ArraySource(h, y), out, format=fmt, dtype="float32", chunk_bytes=CHUNK)
    perm = torch.randperm(len(h), generator=torch.Generator().manual_seed(0))
    shuffled = TensorDataset(h[perm], y[perm])
    first_wrong = int(torch.nonzero(y[perm] != y).flatten()[0])
    for make in (lambda ds: TargetsDataset(out, ds).batch(torch.arange(len(h))),
                 lambda ds: TargetsDataset(out, ds)[first_wrong],
                 lambda ds: _read_all(TargetsDataset(out, ds))):
        with pytest.raises(ValueError, match=rf"row {first_wrong} of the training data has label "
                                             rf"{int(y[perm][first_wrong])}, but the targets in .* were made from a row "
                                             rf"labelled {int(y[first_wrong])}: .* pass check_labels=False"):
            make(shuffled)
        make(TensorDataset(h, y))  # in order: taken
    unlabelled = y.clone()
    unlabelled[first_wrong] = -100
    TargetsDataset(out, TensorDataset(h, unlabelled))[first_wrong]  # -100: not compared
    TargetsDataset(out, TensorDataset(h[perm], y[perm]), check_labels=False)[first_wrong]
    TargetsDataset(out, h[perm]).batch(torch.arange(len(h)))  # a tensor of inputs holds no labels: nothing compared
    TargetsDataset(out, TensorDataset(h, torch.rand(len(h)))).batch(torch.arange(len(h)))  # float: weights, not labels
    TargetsDataset(out, [{"x": h[i], "label": -1} for i in range(len(h))])[first_wrong]  # GLUE's "no label"
    stored = shards.read(fmt, out, {"*": f"shard-000000.{fmt}"} if fmt != "npy" else
                         {"labels": "shard-000000.labels.npy"}, "float32")["labels"]
    assert stored.dtype == torch.int16 and torch.equal(stored.long(), y[:len(stored)])
    if fmt == "npy":
        no_labels = str(tmp_path / "no_labels")  # as written before session 65, or from a source without labels
        generate_targets(projector, ArraySource(h), no_labels, chunk_bytes=CHUNK)
        assert not any("labels" in name for name in os.listdir(no_labels))
        TargetsDataset(no_labels, shuffled).batch(torch.arange(len(h)))


def _read_all(dataset):
    return list(DataLoader(dataset, batch_size=64))


def test_stored_labels_are_not_a_column_of_the_hf_dataset(problem, tmp_path):
    """to_hf_dataset is joined to the user's tokenised dataset, which has its own labels column."""
    pytest.importorskip("datasets")
    h, y, projector = problem
    out = str(tmp_path / "t")
    generate_targets(projector, ArraySource(h, y), out, chunk_bytes=CHUNK)
    assert TargetsDataset(out).to_hf_dataset().column_names == ["log_targets"]
