#!/usr/bin/env bash
# One prepared GPU measurement (~5 minutes on an H100/H200, compilation included), nothing fetched
# from the network: the 95M BitNet config at 32 x 1024 tokens, our train step with `xla` and with
# `cudnn` attention, tokens/s, MFU and the time a full 60,000-step run would take.
#
#   bash benchmarks/gpu_bench.sh                      # on the GPU machine, from the repository root
#   OUT=/some/dir bash benchmarks/gpu_bench.sh        # also writes gpu_bench.{md,json,log} there
#
# Environment knobs (defaults in brackets): CONFIG [configs/bitnet_95m.yaml], SETS [""] extra
# "--set k=v" arguments, STEPS [20] timed steps, WARMUP [3], ATTENTION [cudnn,xla on GPU, xla
# elsewhere], TOTAL_STEPS [60000], PROFILE [1]: also trace 5 steps of the first contestant and print
# where the time goes (kernel time by the model's named scopes), BENCH_TIMEOUT [270] seconds for the Python part (on expiry it
# stops measuring and still prints the table of the steps timed so far), PYTHON
# [.venv/bin/python if present, else python3]. The benchmark needs only jax, flax, optax, numpy and
# PyYAML (random token batches: no tokenizer, datasets or tensorboardX). INSTALL_WHEELS=1 first
# installs the wheels carried in .whl/ with pip --no-index (not needed for this benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/bitnet_95m.yaml}
SETS=${SETS:-}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
TOTAL_STEPS=${TOTAL_STEPS:-60000}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-270}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
# Let XLA keep most of the GPU for the step (default 75%); a single process owns the device.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}

LOG=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; LOG="$OUT/gpu_bench.log"; fi
say() { echo "$@" | tee -a "$LOG"; }

say "== gpu_bench.sh $(date -u +%FT%TZ) on $(hostname)"
say "== nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi 2>&1 | tee -a "$LOG"; else say "(no nvidia-smi)"; fi

if [ "${INSTALL_WHEELS:-0}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  say "== installing carried wheels from .whl/ (no network)"
  $PY -m pip install --no-index --find-links .whl .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
fi

say "== python packages and devices"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "numpy", "yaml"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:8s} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # report and go on: the benchmark says what it cannot do
        print(f"{name:8s} MISSING ({type(e).__name__}: {e})")
import jax
print("backend ", jax.default_backend())
print("devices ", jax.devices())
EOF

if [ -z "${ATTENTION:-}" ]; then
  if $PY -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
    ATTENTION=cudnn,xla  # the expected winner first, in case time runs out
  else
    ATTENTION=xla  # cuDNN attention exists only on NVIDIA GPUs
  fi
fi

set_args=()
for kv in $SETS; do set_args+=(--set "$kv"); done
out_args=()
if [ "${PROFILE:-1}" = 1 ]; then out_args+=(--profile); fi
if [ -n "${OUT:-}" ]; then out_args+=(--out "$OUT/gpu_bench.md" --json "$OUT/gpu_bench.json"); fi

say "== bench_train.py --config $CONFIG ${SETS:+(--set $SETS)} --attention $ATTENTION"
timeout "$BENCH_TIMEOUT" $PY benchmarks/bench_train.py --config "$CONFIG" "${set_args[@]}" \
  --steps "$STEPS" --warmup "$WARMUP" --attention "$ATTENTION" --total-steps "$TOTAL_STEPS" \
  "${out_args[@]}" 2>&1 | grep -v -E "^\s*$|UserWarning|warnings.warn" | tee -a "$LOG"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then say "== bench_train.py exited with status $status"; fi
say "== done"
exit "$status"
