"""benchmarks/bench_gpu.py, the one GPU validation command, runs end to end on the CPU (--quick,
Triton interpreter): its checks pass and it prints every table, so it works when a GPU is lent."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_quick_run_on_the_cpu(tmp_path):
    pytest.importorskip("triton")
    # "true", as Triton reads it: bench_gpu.py took only "1" and then left the interpreter's bf16 dots
    # unpatched (its targets check failed)
    env = {**os.environ, "TRITON_INTERPRET": "true"}
    out = subprocess.run([sys.executable, "bench_gpu.py", "--device", "cpu", "--quick", "--workdir", str(tmp_path),
                          "--csv", str(tmp_path / "gpu.csv")], cwd=os.path.join(ROOT, "benchmarks"), env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "checks targets,loss,online_loss,past_2_31: 0 failure(s)" in out.stdout
    assert "| targets | 4096x64,K=16 | bfloat16 |" in out.stdout and "| loss fwd+bwd |" in out.stdout
    assert "| kd targets | 999,C=300 | bfloat16 |" in out.stdout
    for job in ("| fit exact | cpu |", "| fit nystrom | cpu |", "| offline targets | cpu |"):
        assert job in out.stdout
    assert (tmp_path / "gpu.csv").exists() and (tmp_path / "gpu_jobs.csv").exists()


def test_loss_check_takes_the_whole_product_on_a_gpu_and_a_cross_section_interpreted(monkeypatch):
    """The interpreter ran all 30 (dtype, divergence, teachers) cases of each loss check shape (205 s of
    this file's 254 s on 2026-12-03), then each divergence once a shape (46 s); it now runs one case a
    shape, turning with it, so that the 6 shapes take every divergence, dtype and teacher count; a GPU
    still runs the product."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_gpu

    dtypes = ["fp32", "fp16", "bf16"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert len(set(bench_gpu.loss_check_cases(dtypes, 0))) == len(dtypes) * len(bench_gpu.DIVERGENCES) * 2
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    per_shape = [bench_gpu.loss_check_cases(dtypes, i) for i in range(6)]
    assert all(len(cases) == 1 for cases in per_shape)
    seen = [case for cases in per_shape for case in cases]
    assert {t for t, _, _ in seen} == set(dtypes) and {m for _, _, m in seen} == {None, 3}
    assert {d for _, d, _ in seen} == set(bench_gpu.DIVERGENCES)


def test_targets_check_takes_the_whole_product_on_a_gpu_and_a_cross_section_interpreted(monkeypatch):
    """The interpreter ran the 6 (dtype, head or given logits) cases of each of the 10 targets check
    shapes (55 s on 2026-12-03); it now runs one a shape, turning with it, and a GPU still runs the 6."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_gpu

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    product = bench_gpu.targets_check_cases(0)
    assert len(set(product)) == 6
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    per_shape = [bench_gpu.targets_check_cases(i) for i in range(10)]
    assert all(len(cases) == 1 for cases in per_shape)
    assert {case for cases in per_shape for case in cases} == set(product)


def _quick_run(script: str, *args: str) -> subprocess.CompletedProcess:
    """A GPU benchmark script of benchmarks/ run on the CPU (--quick, Triton's interpreter); it must exit 0."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, script, "--device", "cpu", "--quick", *args],
                         cwd=os.path.join(ROOT, "benchmarks"), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_targets_sweep_quick_run_on_the_cpu(tmp_path):
    """benchmarks/sweep_targets_gpu.py (the H200's config sweep, 2026-12-04) runs end to end under the
    interpreter: each config's error against the reference on the sampled rows, and the best ones."""
    out = _quick_run("sweep_targets_gpu.py", "--csv", str(tmp_path / "sweep.csv"))
    best = [line for line in out.stdout.splitlines() if line.startswith("best at ")]
    assert len(best) == 2 and all("kernel 64/64/4/1/" in line for line in best), out.stdout
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and all(float(r.split(",")[-2]) < 1e-4 for r in rows[1:]), rows


def test_targets_ab_quick_run_on_the_cpu(tmp_path):
    """benchmarks/targets_ab_gpu.py (an earlier commit's targets against this tree's, 2026-12-04) runs
    end to end under the interpreter, here with this tree's targets.py as the "before": both loaded,
    each checked against the reference on sampled rows."""
    before = os.path.join(ROOT, "lelp_fast", "kernels", "triton", "targets.py")
    _quick_run("targets_ab_gpu.py", "--before", before, "--csv", str(tmp_path / "ab.csv"))
    with open(tmp_path / "ab.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(float(r["before_err"]) < 1e-3 and float(r["after_err"]) < 1e-3 for r in rows), rows


def test_loss_cap_ab_quick_run_on_the_cpu(tmp_path):
    """benchmarks/loss_cap_ab_gpu.py (the λ ≠ 1 loss with teachers, with the register cap and without,
    2026-12-05) runs end to end under the interpreter, which takes the cap and ignores it: every output
    written, the two launches equal."""
    _quick_run("loss_cap_ab_gpu.py", "--csv", str(tmp_path / "cap.csv"))
    with open(tmp_path / "cap.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and all(r["bitwise"] == "True" for r in rows), rows


def test_check_shards_take_every_case_once(monkeypatch):
    """``--shard I/N`` (gpu_session.sh runs the loss check in 8 processes): the N shards take every case
    exactly once between them; a malformed spec is a one-line error."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_gpu

    shards = [bench_gpu.Shard(f"{i}/3") for i in range(3)]
    taken = [[shard.takes_next() for _ in range(10)] for shard in shards]
    assert all(sum(column) == 1 for column in zip(*taken)), taken
    for spec in ("3/3", "a/2", "1", "-1/2"):
        with pytest.raises(SystemExit, match="--shard takes I/N"):
            bench_gpu.Shard(spec)
