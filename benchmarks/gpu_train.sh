#!/usr/bin/env bash
# A short real run of train.py with the 95M config on a lent GPU: the whole loop (data thread,
# instrumentation, async checkpoints) rather than the bare step of gpu_bench.sh. Installs nothing
# from the network: wheels missing on the GPU image (tensorboardX, datasets and its needs) are
# installed from .whl/ with --no-index. Text comes from local files (DATA_FILES), so no hub access.
#
#   DATA_FILES="a.txt b.txt" TOKENIZER=dir STEPS=300 bash benchmarks/gpu_train.sh
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
TOKENIZER=${TOKENIZER:-../shared/data/llama2_tokenizer}
DATA_FILES=${DATA_FILES:?give local text files, e.g. DATA_FILES=\"a.txt b.txt\"}
RUNS=${RUNS:-/tmp/gpu_runs}
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
files=$(printf '"%s",' $DATA_FILES); files="[${files%,}]"

$PY train.py --config configs/bitnet_95m.yaml --runs-dir "$RUNS" --run-id gpu95m \
  --set train.steps="$STEPS" --set optim.warmup_steps=50 --set tokenizer.name_or_path="$TOKENIZER" \
  --set data.source=local --set "data.data_files=$files" --set data.num_workers=8 \
  --set eval.every=100 --set eval.batches=1 --set checkpoint.every=100 \
  --set log.metrics_every=100 --set log.samples_every=150
status=$?
$PY status.py "$RUNS/gpu95m" || true
exit $status
