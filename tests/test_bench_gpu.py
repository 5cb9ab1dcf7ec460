"""benchmarks/bench_gpu.py, the one GPU validation command, runs end to end on the CPU (--quick,
Triton interpreter): its checks pass and it prints every table, so it works when a GPU is lent."""

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
    for job in ("| fit exact | cpu |", "| fit nystrom | cpu |", "| offline targets | cpu |"):
        assert job in out.stdout
    assert (tmp_path / "gpu.csv").exists() and (tmp_path / "gpu_jobs.csv").exists()
