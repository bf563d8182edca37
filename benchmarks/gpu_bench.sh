#!/usr/bin/env bash
# One prepared GPU measurement, nothing fetched from the network: the 95M BitNet config at 32 x 1024
# tokens, one process per row (so each row's peak device memory is its own), in this order (the most
# wanted first, in case the time budget runs out):
#   1. bitnet-jax BitNet, matmul float, cuDNN attention   (+ a profiler trace: the step's GPU time by category)
#   2. transformers BitNetForCausalLM in PyTorch, eager  (bf16 autocast, fused AdamW, same batch)
#   3. bitnet-jax BitNet, matmul int8                     (+ the compiled HLO's verdict on its int8 products)
#   4. bitnet-jax dense twin (model.quantization none)
#   5. row 1 with autodiff's backward for the linear products (float32 x bf16), as before
#      model.compute_dtype_matmul: what that change gained (unmeasured on a GPU before this script)
#   6. bitnet-jax BitNet, matmul float, XLA attention
#   7. transformers BitNetForCausalLM under torch.compile
# then benchmarks/gpu_report.py prints one table (tokens/s, step time, MFU, peak memory), the ratios
# (ours / transformers eager and compiled, BitNet / dense twin, int8 / dense twin), the dry run's
# memory estimate beside the measured peak (jax memory_stats peak_bytes_in_use) and XLA's buffer
# assignment, the int8 verdict and the time breakdown, and writes
# benchmarks/results/gpu-<device>-<date>.json (also copied to $OUT). About 6-8 minutes on an H200.
#
#   bash benchmarks/gpu_bench.sh                      # on the GPU machine, from the repository root
#   OUT=/some/dir bash benchmarks/gpu_bench.sh        # also writes the results, table, log and HLO there
#
# Environment knobs (defaults in brackets): CONFIG [configs/bitnet_95m.yaml], SETS [""] extra
# "--set k=v" arguments for every row, STEPS [20] timed steps, WARMUP [3], TOTAL_STEPS [60000],
# BEST_ATTENTION [cudnn on a GPU, else xla]: the attention of rows 1, 3, 4 and 5, PROFILE [1],
# HF [1]: rows 2 and 7, TORCH_COMPILE [1 on a GPU, else 0]: row 7, ROW_TIMEOUT [150] seconds per
# row (COMPILE_TIMEOUT [240] for row 7), BUDGET [330] seconds: no row starts after that (so the
# script ends within about 9.5 minutes, under the device tool's 10), RESULTS_DIR [benchmarks/results],
# PYTHON [.venv/bin/python if present, else python3]. XLA's persistent compilation cache
# (JAX_COMPILATION_CACHE_DIR [/tmp/bitnet_jax_xla_cache]) makes a rerun on the same machine skip
# most compilation. The rows need only jax, flax, optax, numpy and PyYAML (plus torch and
# transformers for rows 2 and 7): no tokenizer, datasets or tensorboardX.
#
# Wheels for the full train loop on the GPU image (benchmarks/gpu_train.sh; not needed here), made
# on a machine with PyPI access, in the repository root (/.whl/ is git-ignored; never commit them):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl tensorboardX==2.6.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# and name .whl in the device call's carry; INSTALL_WHEELS=1 installs them into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/bitnet_95m.yaml}
SETS=${SETS:-}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
TOTAL_STEPS=${TOTAL_STEPS:-60000}
ROW_TIMEOUT=${ROW_TIMEOUT:-150}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-240}
BUDGET=${BUDGET:-330}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
# Let XLA keep most of the GPU for the step (default 75%); each row's process owns the device.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/bitnet_jax_xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}

LOG=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; LOG="$OUT/gpu_bench.log"; fi
ROWS=$(mktemp -d /tmp/gpu_bench_rows.XXXXXX)
say() { echo "$@" | tee -a "$LOG"; }
START=$SECONDS

say "== gpu_bench.sh $(date -u +%FT%TZ) on $(hostname)"
say "== nvidia-smi"
DEVICE=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi 2>&1 | tee -a "$LOG"
  DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
else
  say "(no nvidia-smi)"
fi

if [ "${INSTALL_WHEELS:-0}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  say "== installing carried wheels from .whl/ into /tmp/site (no network)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3 | tee -a "$LOG" && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

say "== python packages and devices"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "numpy", "yaml", "torch", "transformers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:12s} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # report and go on: the rows say what they cannot do
        print(f"{name:12s} MISSING ({type(e).__name__}: {e})")
import jax
print("backend     ", jax.default_backend())
print("devices     ", jax.devices())
EOF

ON_GPU=0
if $PY -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then ON_GPU=1; fi
BEST_ATTENTION=${BEST_ATTENTION:-$([ "$ON_GPU" = 1 ] && echo cudnn || echo xla)}
TORCH_COMPILE=${TORCH_COMPILE:-$ON_GPU}
set_args=()
for kv in $SETS; do set_args+=(--set "$kv"); done

files=()
status=0
row() {  # row NAME ARGS...: one bench_train.py process, its JSON in $ROWS/NAME.json
  local name=$1; shift
  if [ $((SECONDS - START)) -ge "$BUDGET" ]; then
    say "== row $name skipped: the ${BUDGET}s budget is spent"; return
  fi
  say "== row $name: bench_train.py $*"
  # SIGTERM lets bench_train.py report the steps timed so far; SIGKILL 20 s later if it cannot.
  timeout -k 20 "${ROW_SECONDS:-$ROW_TIMEOUT}" $PY benchmarks/bench_train.py --config "$CONFIG" "${set_args[@]}" --steps "$STEPS" \
    --warmup "$WARMUP" --total-steps "$TOTAL_STEPS" --json "$ROWS/$name.json" "$@" 2>&1 \
    | grep -v -E "^\s*$|UserWarning|warnings.warn" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then say "== row $name exited with status $rc"; status=1; fi
  files+=("$ROWS/$name.json")
}

profile_args=()
if [ "${PROFILE:-1}" = 1 ]; then profile_args+=(--profile); fi
hlo_args=()
if [ -n "${OUT:-}" ]; then hlo_args+=(--hlo-out "$OUT/int8_hlo.txt"); fi

row bitnet-float-$BEST_ATTENTION --set model.attention="$BEST_ATTENTION" "${profile_args[@]}"
if [ "${HF:-1}" = 1 ]; then row transformers-eager --hf-only --hf-mode eager; fi
row bitnet-int8-$BEST_ATTENTION --set model.attention="$BEST_ATTENTION" --set model.matmul=int8 "${hlo_args[@]}"
row dense-$BEST_ATTENTION --set model.attention="$BEST_ATTENTION" --set model.quantization=none
row bitnet-float-$BEST_ATTENTION-autodiff-matmul --set model.attention="$BEST_ATTENTION" --autodiff-matmul
if [ "$BEST_ATTENTION" != xla ]; then row bitnet-float-xla --set model.attention=xla; fi
if [ "${HF:-1}" = 1 ] && [ "$TORCH_COMPILE" = 1 ]; then
  ROW_SECONDS=$COMPILE_TIMEOUT row transformers-compile --hf-only --hf-mode compile
fi

say "== report ($((SECONDS - START)) s so far)"
report_args=(--results-dir "$RESULTS_DIR")
if [ -n "$DEVICE" ]; then report_args+=(--device "$DEVICE"); fi
if [ -n "${OUT:-}" ]; then report_args+=(--md "$OUT/gpu_bench.md" --copy-to "$OUT"); fi
$PY benchmarks/gpu_report.py "${files[@]}" "${report_args[@]}" 2>&1 | tee -a "$LOG"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then status=1; fi
rm -rf "$ROWS"
say "== done in $((SECONDS - START)) s"
exit "$status"
