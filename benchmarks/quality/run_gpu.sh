#!/usr/bin/env bash
# The full-size training-quality suite in one call, for a machine with a GPU.
#
# Prerequisites (the GPU machine may have no network: prepare them first):
#   * the project installed with the bench extra and a CUDA jaxlib, e.g.
#       pip install -c constraints.txt -e ".[bench]" "jax[cuda12]==0.8.3"
#   * the datasets: apt-get install -y --no-install-recommends \
#       dataset-fashion-mnist bible-kjv
#
# Usage, from the repository root:
#   bash benchmarks/quality/run_gpu.sh                 # every stage
#   STAGES=tune,test bash benchmarks/quality/run_gpu.sh
#   OUT=/some/dir bash benchmarks/quality/run_gpu.sh   # runs + summary elsewhere
#
# It is resumable: finished runs (one JSON each) are skipped, so the same
# command continues an interrupted suite. DEADLINE=HH:MM (UTC) stops launching
# runs after that time; the summary is rebuilt at the end either way.
set -euo pipefail

PYTHON=${PYTHON:-python}
STAGES=${STAGES:-tune,test,ablate,best,lm,resnet}
OUT=${OUT:-benchmarks/results/quality/full}
DEADLINE=${DEADLINE:-}
CACHE=${CACHE:-${TMPDIR:-/tmp}/nysact_quality_xla_cache}

"$PYTHON" - <<'EOF'
import jax, sys
from benchmarks import data
print("jax", jax.__version__, "devices:", jax.devices(), flush=True)
if jax.default_backend() == "cpu":
  print("warning: no accelerator found; the full suite will take days on a CPU", file=sys.stderr)
try:
  data.load_fashion_mnist("test", limit=1)
except data.DatasetMissingError as e:
  sys.exit(str(e))
EOF

mkdir -p "$OUT"
args=(--preset full --stages "$STAGES" --out-dir "$OUT/runs" --cache-dir "$CACHE")
if [[ -n "$DEADLINE" ]]; then args+=(--deadline "$DEADLINE"); fi
PYTHONUNBUFFERED=1 "$PYTHON" -m benchmarks quality "${args[@]}" 2>&1 | tee -a "$OUT/suite.log" || true
"$PYTHON" -m benchmarks quality-summary --runs "$OUT/runs"
