#!/usr/bin/env bash
# A second device call (issue 21, 2026-12-04): the Triton targets kernels' launch configurations
# timed at the table's shapes (sweep_targets_gpu.py), the loss's host share (loss_host_gpu.py), and
# the parts of gpu_session.sh's first run that failed, rerun after their fixes. The kernels compile
# side by side first (Triton's and Inductor's caches), then each timing runs alone on the GPU.
#   LELP_GPU_EXT=.gpu_carry/_C.cpython-312-x86_64-linux-gnu.so bash benchmarks/gpu_sweep.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/lelp_gpu_sweep}"
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
[ -n "${LELP_GPU_EXT:-}" ] && cp "$LELP_GPU_EXT" lelp_fast/
: > "$out/results.txt"
part() {  # part NAME TIMEOUT CMD...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name: rc=$?" >> "$out/results.txt"
}
shards=12
for ((i = 0; i < shards; i++)); do
  timeout 120 python3 benchmarks/sweep_targets_gpu.py --compile "$i/$shards" > /dev/null 2>&1 &
done
part rerun_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py \
  -k "second_backward or subclass_weight_nan_rows or subclass_weight_mean_mixed" &
(part rerun_check_past_2_31 60 python3 benchmarks/bench_gpu.py --check past_2_31
 timeout 60 python3 benchmarks/loss_host_gpu.py > /dev/null 2>&1) &  # warms Inductor's cache
wait
part sweep_targets 150 python3 benchmarks/sweep_targets_gpu.py --csv "$out/sweep_targets.csv"
part loss_host 60 python3 benchmarks/loss_host_gpu.py
echo "== results ($SECONDS s)"; cat "$out/results.txt"
tail -3 "$out/rerun_tests.txt"; grep -E "^checks|FAIL" "$out/rerun_check_past_2_31.txt"
grep "^best at" "$out/sweep_targets.txt"; cat "$out/loss_host.txt"
