#!/usr/bin/env bash
# Benchmarks 1-3 (step time, scaling, conv statistics) in one call, for a
# machine with a GPU. Results go to benchmarks/results/gpu/ (the JSON names
# the device); the README's GPU columns come from there.
#
# Prerequisites (the GPU machine may have no network: prepare them first):
#   * the project with the bench extra and a CUDA jaxlib, e.g.
#       pip install -c constraints.txt -e ".[bench]" "jax[cuda12]==0.8.3"
#   * the datasets: apt-get install -y --no-install-recommends \
#       dataset-fashion-mnist bible-kjv
#
# Usage, from the repository root (about 10 minutes on one H100):
#   bash benchmarks/run_gpu.sh
#   ONLY=step_time bash benchmarks/run_gpu.sh
set -euo pipefail

PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results/gpu}
ONLY=${ONLY:-step_time,scaling,conv_stats}
mkdir -p "$OUT"

"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices(), flush=True)'

if [[ ",$ONLY," == *",step_time,"* ]]; then
  # Same models, batches and optimizers as on the CPU; K-FAC timed by whole
  # blocks when they fit (--max-block-s).
  "$PYTHON" -m benchmarks.step_time --rounds 5 --max-block-s 60 --blas-threads 0 \
      --out "$OUT/step_time.json"
fi
if [[ ",$ONLY," == *",scaling,"* ]]; then
  "$PYTHON" -m benchmarks.scaling --blas-threads 0 --max-eigh-p 16384 --max-cholesky-p 16384 \
      --out "$OUT/scaling.json"
fi
if [[ ",$ONLY," == *",conv_stats,"* ]]; then
  "$PYTHON" -m benchmarks.conv_stats --blas-threads 0 --in-cond-max-elems 1000000000 \
      --out "$OUT/conv_stats.json"
fi
