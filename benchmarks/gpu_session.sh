#!/usr/bin/env bash
# The device call(s) of a session lent a GPU (issues 12, 21): build with the CUDA kernels, validate
# every GPU op against the fp64 reference (each bench_gpu.py check in its own process, so one crash
# cannot hide the rest), run every backend's GPU tests (tests/test_triton.py included), then time
# (bench_gpu.py's tables). python3 is the GPU image's Python. Not yet run on a GPU. The timeouts
# (4 x 60 s checks, 2 x 120 s tests, 240 s tables, plus the build) can add up to more than one
# 10-minute call: LELP_GPU_PARTS picks the parts of one call ("checks tests" in one, "tables" in
# the next; default all three). Results go to $OUT (the device tool brings them back):
# results.txt (every part's exit status, printed first), gpu.txt, build.log, check_<name>.txt,
# gpu_tests.txt, bench_gpu.txt/.csv/_jobs.csv.
#   bash benchmarks/gpu_session.sh                  # on the GPU machine
#   LELP_GPU_DRY=1 bash benchmarks/gpu_session.sh   # logic check on a CPU machine (tiny sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/lelp_gpu_session}"
mkdir -p "$out"
dry="${LELP_GPU_DRY:-0}"
parts=" ${LELP_GPU_PARTS:-checks tests tables} "
: > "$out/results.txt"
failed=0

record() {  # record NAME RC: one line per part in results.txt
  echo "$1: rc=$2" >> "$out/results.txt"
  [ "$2" = 0 ] || failed=1
}

{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/gpu.txt"
if [ "$dry" != 1 ]; then
  python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
  build_rc=$?
  record build "$build_rc"
  [ "$build_rc" = 0 ] || { tail -40 "$out/build.log"; cat "$out/results.txt"; exit 1; }
fi
python3 -c "import lelp_fast._C as c; print('extension has_cuda:', c.has_cuda)" | tee -a "$out/gpu.txt"

# Timeouts (s): checks, tests, tables. The dry mode runs the Triton interpreter on a CPU: slower.
if [ "$dry" = 1 ]; then
  bench=(env TRITON_INTERPRET=1 python3 benchmarks/bench_gpu.py --device cpu --quick)
  t_check=900; t_tests=900; t_tables=600
else
  bench=(python3 benchmarks/bench_gpu.py)
  t_check=60; t_tests=120; t_tables=240
fi

# 1. The checks, each in its own process.
if [[ "$parts" == *" checks "* ]]; then
  for check in targets loss online_loss past_2_31; do
    timeout "$t_check" "${bench[@]}" --check "$check" > "$out/check_$check.txt" 2>&1
    record "check $check" $?
  done
fi

# 2. The GPU tests of every backend (they skip without a GPU; -k also picks the cuda_emu cases,
# which run anywhere). tests/test_triton.py is the default backend's: all of it runs on a GPU; in
# the dry mode it runs under the interpreter, so only its collection is checked there.
triton_tests=(tests/test_triton.py)
[ "$dry" = 1 ] && triton_tests=(--co tests/test_triton.py)
if [[ "$parts" == *" tests "* ]]; then
  timeout "$t_tests" python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_ops_loss.py \
    tests/test_ops_targets.py tests/test_device_copy.py tests/test_fit_streaming.py tests/test_offline_targets.py \
    tests/test_gpu_graphs.py > "$out/gpu_tests.txt" 2>&1
  record "gpu tests (cuda, gpu)" $?
  timeout "$t_tests" python3 -m pytest -q -p no:cacheprovider "${triton_tests[@]}" >> "$out/gpu_tests.txt" 2>&1
  record "gpu tests (triton)" $?
fi

# 3. The tables (no checks: they ran above).
if [[ "$parts" == *" tables "* ]]; then
  timeout "$t_tables" "${bench[@]}" --check none --csv "$out/bench_gpu.csv" > "$out/bench_gpu.txt" 2>&1
  record "tables" $?
fi

# Results first, then the tables.
echo "== results"; cat "$out/results.txt"
for check in targets loss online_loss past_2_31; do
  [ -f "$out/check_$check.txt" ] && grep -E "^checks|FAIL|Error" "$out/check_$check.txt" | head -20
done
[ -f "$out/gpu_tests.txt" ] && grep -E "passed|failed|error" "$out/gpu_tests.txt" | tail -4
echo "== tables"; [ -f "$out/bench_gpu.txt" ] && tail -40 "$out/bench_gpu.txt"
exit "$failed"
