#!/usr/bin/env bash
# The one device call of a session lent a GPU (issue 12): build with the CUDA kernels, validate every
# GPU op against the fp64 reference and time it (bench_gpu.py), run the GPU tests. python3 is the GPU
# image's Python. Not yet run on a GPU; its timeouts (330 s + 150 s plus the build) keep it within
# one 10-minute device call. Results go to $OUT (the device tool brings them back): gpu.txt,
# build.log, bench_gpu.txt/.csv/_jobs.csv, gpu_tests.txt.
#   bash benchmarks/gpu_session.sh            # on the GPU machine
#   LELP_GPU_DRY=1 bash benchmarks/gpu_session.sh   # logic check on a CPU machine (tiny sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/lelp_gpu_session}"
mkdir -p "$out"
dry="${LELP_GPU_DRY:-0}"

{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/gpu.txt"
if [ "$dry" != 1 ]; then
  python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
fi
python3 -c "import lelp_fast._C as c; print('extension has_cuda:', c.has_cuda)" | tee -a "$out/gpu.txt"

if [ "$dry" = 1 ]; then
  TRITON_INTERPRET=1 timeout 300 python3 benchmarks/bench_gpu.py --device cpu --quick --csv "$out/bench_gpu.csv" \
    > "$out/bench_gpu.txt" 2>&1
else
  timeout 330 python3 benchmarks/bench_gpu.py --csv "$out/bench_gpu.csv" > "$out/bench_gpu.txt" 2>&1
fi
bench_rc=$?
tail -45 "$out/bench_gpu.txt"

# The tests that need a GPU (they skip elsewhere; -k also picks the cuda_emu cases, which run anywhere).
timeout 150 python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_ops_loss.py tests/test_ops_targets.py \
  tests/test_device_copy.py tests/test_fit_streaming.py tests/test_offline_targets.py tests/test_gpu_graphs.py \
  > "$out/gpu_tests.txt" 2>&1
tests_rc=$?
tail -15 "$out/gpu_tests.txt"
echo "bench_gpu rc=$bench_rc, gpu tests rc=$tests_rc" | tee -a "$out/gpu.txt"
[ "$bench_rc" = 0 ] && [ "$tests_rc" = 0 ]
