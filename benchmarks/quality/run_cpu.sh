#!/usr/bin/env bash
# The reduced training-quality suite (--preset cpu) on a CPU-only machine:
# one worker per core, each pinned to its core with single-threaded XLA, so
# that every run is timed alike (one core each) and the wall-clock columns of
# different optimizers compare. The workers share the suite's queue (lock
# files); finished runs are skipped, so the same command resumes.
#
# Usage, from the repository root:
#   bash benchmarks/quality/run_cpu.sh
#   STAGES=lm bash benchmarks/quality/run_cpu.sh
#   WORKERS=1 DEADLINE=09:30 bash benchmarks/quality/run_cpu.sh
set -euo pipefail

PYTHON=${PYTHON:-python}
STAGES=${STAGES:-tune,test,ablate,best,lm,resnet}
WORKERS=${WORKERS:-$(nproc)}
CACHE=${CACHE:-${TMPDIR:-/tmp}/nysact_quality_xla_cache}
DEADLINE_ARGS=()
if [[ -n "${DEADLINE:-}" ]]; then DEADLINE_ARGS=(--deadline "$DEADLINE"); fi

export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
pids=()
for ((i = 0; i < WORKERS; i++)); do
  taskset -c "$i" "$PYTHON" -m benchmarks quality --preset cpu --stages "$STAGES" \
      --cache-dir "$CACHE" --wait "${DEADLINE_ARGS[@]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
"$PYTHON" -m benchmarks quality-summary >/dev/null
echo "summary: benchmarks/results/quality/summary.md"
exit "$status"
