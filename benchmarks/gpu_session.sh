#!/usr/bin/env bash
# The device call of a session lent a GPU (issues 12, 21), sized for one call of a 15-minute lease:
#  1. the extension with the CUDA kernels: a build carried from the developer's machine
#     (LELP_GPU_EXT=path/to/_C.cpython-312-x86_64-linux-gnu.so, built with nvcc for sm_80/sm_90) if it
#     imports with CUDA there, else `pip install --no-build-isolation --no-deps -e .`;
#  2. side by side, each in its own process so one crash cannot hide the rest: every bench_gpu.py
#     check against the fp64 reference (the targets and loss checks in shards, each shard compiling
#     its own kernels into Triton's shared cache), every backend's GPU tests (tests/test_triton.py
#     included), and one untimed pass over the tables that fills Triton's and Inductor's caches;
#  3. alone on the GPU: the tables (bench_gpu.py's kernels, then its jobs), as long as time is left.
# A part that ran out of time is recorded with rc=124. Results go to $OUT (the device tool brings
# back at most 8 files): results.txt (every part's exit status), tables.txt, bench_gpu.csv,
# bench_gpu_jobs.csv, logs.tar.gz (every part's full log), triton_cache.tar.gz (the kernels the JIT
# compiled: metadata and cubins). The summary is printed last.
#   LELP_GPU_EXT=.gpu_carry/_C.cpython-312-x86_64-linux-gnu.so bash benchmarks/gpu_session.sh
#   LELP_GPU_DRY=1 bash benchmarks/gpu_session.sh    # logic check on a CPU machine (tiny sizes)
# LELP_GPU_DEADLINE (s, default 500) bounds the whole script: give the device call more than that.
# LELP_GPU_OPS (default "targets loss") picks the ops whose checks, tests and tables run (a session
# that changed one op's kernels reruns its part); LELP_GPU_JOBS=0 leaves out the jobs' table.
# LELP_GPU_AB_BEFORE=benchmarks/_targets_before.py (an earlier commit's targets.py, `git show
# <commit>:lelp_fast/kernels/triton/targets.py > benchmarks/_targets_before.py`) adds, after the
# tables, benchmarks/targets_ab_gpu.py: those targets against this tree's, in one process (ab.csv).
# With the loss among the ops, benchmarks/loss_cap_ab_gpu.py comes last: the λ ≠ 1 loss with teachers
# with its register cap and without (loss.max_registers), which ptxas's trade runs faster.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/lelp_gpu_session}"
logs="$(mktemp -d)"
mkdir -p "$out"
dry="${LELP_GPU_DRY:-0}"
ops=" ${LELP_GPU_OPS:-targets loss} "
for op in $ops; do
  [[ "$op" == targets || "$op" == loss ]] || { echo "LELP_GPU_OPS: unknown op '$op' (targets, loss)"; exit 2; }
done
deadline=$((SECONDS + ${LELP_GPU_DEADLINE:-500}))
# The kernels the JIT compiled, brought back to hold against the facts the CPU gates recorded
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$logs/triton_cache}"
: > "$out/results.txt"

left() {  # seconds left before the deadline, at most $1
  local n=$((deadline - SECONDS))
  ((n < $1)) && echo $((n > 1 ? n : 1)) || echo "$1"
}

part() {  # part NAME TIMEOUT CMD...: runs CMD into logs/NAME.txt, records its exit status
  local name=$1 limit
  limit=$(left "$2")
  shift 2
  timeout "$limit" "$@" > "$logs/$name.txt" 2>&1
  echo "$name: rc=$?" >> "$out/results.txt"
}

{ date -u; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; echo "cpus: $(nproc)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$logs/machine.txt"

# 1. The extension, imported from this tree.
export PYTHONPATH="$PWD"
if [ "$dry" = 1 ]; then
  echo "extension: as installed (dry run)" | tee -a "$logs/machine.txt"
elif [ -n "${LELP_GPU_EXT:-}" ] && cp "$LELP_GPU_EXT" lelp_fast/ \
     && python3 -c "import lelp_fast._C as c; assert c.has_cuda" >> "$logs/machine.txt" 2>&1; then
  echo "extension: carried $LELP_GPU_EXT" | tee -a "$logs/machine.txt"
else
  rm -f lelp_fast/_C.*.so
  part build 300 python3 -m pip install --no-build-isolation --no-deps -e .
  echo "extension: built here ($(tail -1 "$out/results.txt"))" | tee -a "$logs/machine.txt"
fi
python3 -c "import lelp_fast._C as c; print('extension has_cuda:', c.has_cuda, c.__file__)" 2>&1 | tee -a "$logs/machine.txt"

if [ "$dry" = 1 ]; then  # the Triton interpreter on a CPU: slower, tiny sizes
  bench=(env TRITON_INTERPRET=1 python3 benchmarks/bench_gpu.py --device cpu --quick)
  triton_tests=(--co tests/test_triton.py)  # under the interpreter only its collection is checked here
else
  bench=(python3 benchmarks/bench_gpu.py)
  triton_tests=(tests/test_triton.py)
fi
xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n 4)
shards=()  # check:count
[[ "$ops" == *" targets "* ]] && shards+=(targets:3)
[[ "$ops" == *" loss "* ]] && shards+=(loss:8)
tables=$(echo $ops | tr ' ' ,)  # bench_gpu.py --parts
select=()  # the tests of the chosen ops alone
[[ "$ops" == *" targets "* && "$ops" == *" loss "* ]] || select=(-k "$(echo $ops)")

# 2. Side by side: the checks, the GPU tests, and a pass over the tables that warms the caches.
for spec in "${shards[@]}"; do
  for ((i = 0; i < ${spec#*:}; i++)); do
    part "check_${spec%:*}_$i" 270 "${bench[@]}" --check "${spec%:*}" --shard "$i/${spec#*:}" &
  done
done
part check_online_loss 270 "${bench[@]}" --check online_loss &
part check_past_2_31 270 "${bench[@]}" --check past_2_31 &
part tests_triton 270 python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" "${select[@]}" "${triton_tests[@]}" &
# -k also picks the cuda_emu cases, which run anywhere
part tests_gpu 270 python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" -k "(cuda or gpu) ${select[1]:+and (${select[1]})}" \
  tests/test_ops_loss.py tests/test_ops_targets.py tests/test_device_copy.py tests/test_fit_streaming.py \
  tests/test_offline_targets.py tests/test_gpu_graphs.py &
part tables_warm 270 "${bench[@]}" --check none --parts "$tables" &
wait

# 3. Alone on the GPU: the tables, then the jobs.
part tables 240 "${bench[@]}" --check none --parts "$tables" --csv "$out/bench_gpu.csv"
[ "${LELP_GPU_JOBS:-1}" = 0 ] || part jobs 150 "${bench[@]}" --check none --parts jobs --csv "$out/bench_gpu.csv"
if [ -n "${LELP_GPU_AB_BEFORE:-}" ]; then
  ab=(python3 benchmarks/targets_ab_gpu.py --before "$LELP_GPU_AB_BEFORE" --csv "$out/ab.csv")
  [ "$dry" = 1 ] && ab=(env TRITON_INTERPRET=1 "${ab[@]}" --device cpu --quick)
  part targets_ab 150 "${ab[@]}"
fi
if [[ "$ops" == *" loss "* ]]; then
  cap=(python3 benchmarks/loss_cap_ab_gpu.py)
  [ "$dry" = 1 ] && cap=(env TRITON_INTERPRET=1 "${cap[@]}" --device cpu --quick)
  part loss_cap_ab 90 "${cap[@]}"
fi
cat "$logs/machine.txt" "$logs/tables.txt" "$logs/jobs.txt" "$logs/targets_ab.txt" "$logs/loss_cap_ab.txt" \
  > "$out/tables.txt" 2>/dev/null
tar czf "$out/logs.tar.gz" -C "$logs" --exclude triton_cache .
# the library's kernels the JIT compiled, metadata and cubins (not Inductor's: with them the cubins
# passed 15 MB on 2026-12-04; json alone if they still do)
(cd "$TRITON_CACHE_DIR" 2>/dev/null && find . -name "*lelp_*.json" -o -name "lelp_*.cubin" | tar czf "$out/triton_cache.tar.gz" -T - \
  && { [ "$(stat -c %s "$out/triton_cache.tar.gz")" -lt 15000000 ] || find . -name "*lelp_*.json" | tar czf "$out/triton_cache.tar.gz" -T -; })

# The summary: every part's status, the checks' failures, the tests' counts, then the tables.
echo "== results (${SECONDS} s)"; cat "$out/results.txt"
grep -h -E "^checks|FAIL|Error" "$logs"/check_*.txt | sort | uniq -c | sort -rn | head -30
grep -h -E "passed|failed|error" "$logs"/tests_*.txt | tail -6
echo "== tables"; tail -30 "$logs/tables.txt"; tail -9 "$logs/jobs.txt" 2>/dev/null
! grep -qv "rc=0$" "$out/results.txt"
