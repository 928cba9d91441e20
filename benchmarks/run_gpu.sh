#!/usr/bin/env bash
# One call, about 12 minutes on one GPU: the step-time zoo, nysact_adam against
# AdamW and Muon, the train-step
# memory table, the matmul-precision study (emulated and as the card computes
# it) and a short training-quality smoke. Every JSON goes to
# benchmarks/results/gpu/<device>/ (<device> from jax.devices()[0].device_kind,
# e.g. nvidia_h100_80gb_hbm3), with a run.json that records what ran, how
# long each part took and its exit status. Each part has its own time limit,
# so one slow part cannot eat the others' time.
#
# Prerequisites (the GPU machine may have no network: prepare them first):
#   * the project with the bench extra and a CUDA jaxlib, e.g.
#       pip install -c constraints.txt -e ".[bench]" "jax[cuda12]==0.8.3"
#   * the datasets: apt-get install -y --no-install-recommends \
#       dataset-fashion-mnist bible-kjv
#
# Usage, from the repository root:
#   bash benchmarks/run_gpu.sh
#   ONLY=memory,precision bash benchmarks/run_gpu.sh
#   ONLY=scaling,conv_stats bash benchmarks/run_gpu.sh   # the longer extras
#   OUT=/tmp/gpu bash benchmarks/run_gpu.sh
# Without a GPU it runs on whatever jax finds (CPU: much longer; the limits
# below then cut parts short, and run.json says so).
set -uo pipefail

PYTHON=${PYTHON:-python}
ONLY=${ONLY:-step_time,adam,memory,precision,quality}
# Seconds per part; the defaults add up to 12.5 minutes.
T_STEP=${T_STEP:-200}
T_MEMORY=${T_MEMORY:-120}
T_PRECISION=${T_PRECISION:-180}
T_QUALITY=${T_QUALITY:-100}
T_ADAM=${T_ADAM:-150}

DEVICE=$("$PYTHON" - <<'EOF'
import re, jax
kind = jax.devices()[0].device_kind
print(re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or jax.default_backend())
EOF
) || { echo "jax does not start" >&2; exit 1; }
OUT=${OUT:-benchmarks/results/gpu/$DEVICE}
mkdir -p "$OUT"
"$PYTHON" - <<'EOF' || exit 1
import jax, sys
from benchmarks import data
print("jax", jax.__version__, "devices:", jax.devices(), flush=True)
if jax.default_backend() == "cpu":
  print("warning: no accelerator found: running on the CPU", file=sys.stderr)
try:
  data.load_fashion_mnist("test", limit=1)
  data.load_kjv_chars()
except data.DatasetMissingError as e:
  sys.exit(str(e))
EOF

PARTS=()
part() {  # part NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, logs it
  local name=$1 limit=$2; shift 2
  if [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/run.log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/run.log"
  local rc=${PIPESTATUS[0]}
  PARTS+=("$name $rc $((SECONDS - t0)) $limit")
}

# 1. Step time: SGD, AdamW, NysAct (rank 10, both sketches; rank 50) and FOOF
#    on the three models, 3 interleaved rounds of 50-step blocks, one JSON per
#    model so that a cut-short part keeps the models it finished (K-FAC: add
#    kfac_5_50 to STEP_OPTIMIZERS; it compiles for minutes).
STEP_OPTIMIZERS=${STEP_OPTIMIZERS:-sgd,adamw,nysact_g10,nysact_s10,nysact_g50,foof}
step_time() {
  for model in cnn transformer resnet20; do
    "$PYTHON" -m benchmarks step_time --models "$model" --optimizers "$STEP_OPTIMIZERS" \
        --rounds 3 --warmup 6 --blas-threads 0 --out "$OUT/step_time_$model.json" || return
  done
}
export -f step_time; export PYTHON OUT STEP_OPTIMIZERS
part step_time "$T_STEP" bash -c step_time
# 1b. nysact_adam (and its orthogonalised variant) against AdamW and Muon on
#    the char transformer and the CNN.
step_time_adam() {
  for model in transformer cnn; do
    "$PYTHON" -m benchmarks step_time --models "$model" \
        --optimizers adamw,muon,nysact_adam,nysact_adam_orth --rounds 3 --warmup 6 \
        --blas-threads 0 --threading default --out "$OUT/step_time_adam_$model.json" || return
  done
}
export -f step_time_adam
part adam "$T_ADAM" bash -c step_time_adam
# 2. Peak memory of a train step: compiled memory analysis and the allocator's
#    peak, one subprocess per optimizer.
part memory "$T_MEMORY" "$PYTHON" -m benchmarks memory --optimizers sgd,adamw,nysact_g10 \
    --blas-threads 0 --out "$OUT/memory.json"
# 3. Matmul precision: the emulated study, plus the library at
#    precision=highest/high/default as this card computes it (the device_*
#    rows), one JSON per model.
precision() {
  for model in cnn transformer; do
    "$PYTHON" -m benchmarks precision --models "$model" --device-configs yes \
        --blas-threads 0 --out "$OUT/precision_$model.json" || return
  done
}
export -f precision
part precision "$T_PRECISION" bash -c precision
# 4. Quality smoke: 300 steps of the Fashion-MNIST CNN, NysAct at the default
#    precision (highest) and at precision=default, beside SGD and AdamW.
if [[ ",$ONLY," == *",quality,"* ]]; then
  q() {
    "$PYTHON" -m benchmarks.quality.train --task fmnist_cnn --steps 300 --eval-every 100 \
        --eval-limit 2000 --seed 0 "$@"
  }
  quality() {
    q --optimizer nysact --lr 0.05 --out "$OUT/quality_nysact.json"
    q --optimizer nysact --lr 0.05 --nysact precision=default \
        --out "$OUT/quality_nysact_precision_default.json"
    q --optimizer sgd --lr 0.05 --out "$OUT/quality_sgd.json"
    q --optimizer adamw --lr 0.003 --out "$OUT/quality_adamw.json"
  }
  export -f q quality
  part quality "$T_QUALITY" bash -c quality
fi
# Extras, not in the default ten minutes: scaling and conv statistics.
part scaling 600 "$PYTHON" -m benchmarks scaling --blas-threads 0 --max-eigh-p 16384 \
    --max-cholesky-p 16384 --out "$OUT/scaling.json"
part conv_stats 600 "$PYTHON" -m benchmarks conv_stats --blas-threads 0 \
    --in-cond-max-elems 1000000000 --out "$OUT/conv_stats.json"

"$PYTHON" - "$OUT" "${PARTS[@]}" <<'EOF'
import json, sys
from benchmarks import _common
out, parts = sys.argv[1], sys.argv[2:]
rows = []
for p in parts:
  name, rc, seconds, limit = p.split()
  rows.append({"part": name, "exit_status": int(rc), "seconds": int(seconds),
               "limit_s": int(limit), "timed_out": rc in ("124", "137")})
_common.write_json(f"{out}/run.json", {"machine": _common.machine_info(), "parts": rows})
print(json.dumps(rows, indent=1))
EOF
