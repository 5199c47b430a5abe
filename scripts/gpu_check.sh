#!/usr/bin/env bash
# GPU readiness, in one short run on a CUDA host (about 10 minutes):
#   1. builds ./.venv with fbgemm-gpu (the CUDA kernels) instead of fbgemm-gpu-cpu,
#   2. prepares 1M rows of synthetic-ctr and trains the DLRM preset on one GPU (--accelerator gpu),
#   3. trains it on 2 GPUs over NCCL when the host has two or more,
# printing the wall time and samples/s of each training (from the first step to the end of fitting).
#   bash scripts/gpu_check.sh [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-1000000}
command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "[gpu-check] no CUDA GPU here" >&2; exit 2; }
GPUS=$(nvidia-smi -L | wc -l)
RECSYS_CUDA=1 bash scripts/setup.sh
OUT=${TMPDIR:-/tmp}/recsys-gpu-check
mkdir -p "$OUT"
.venv/bin/recsys data prepare --dataset synthetic-ctr --rows "$ROWS" --out "$OUT/ctr" --overwrite >/dev/null
run() {  # $1: processes
  local start end
  start=$(date +%s.%N)
  .venv/bin/recsys train --config configs/dlrm-synthetic-ctr.yaml --data "$OUT/ctr" --accelerator gpu \
    --num-workers "$1" --max-epochs 1 --trainer.patience 0 --trainer.progress_bar false \
    --tracking.enabled false --trainer.output_dir "$OUT/runs-$1" | tee "$OUT/metrics-$1.txt"
  end=$(date +%s.%N)
  python3 - "$OUT/ctr/metadata.json" "$start" "$end" "$1" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
rows = meta["splits"]["train"]["rows"]
wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"[gpu-check] {sys.argv[4]} GPU(s): 1 epoch of {rows:,} rows in {wall:.1f}s wall (incl. start-up): {rows / wall:,.0f} rows/s")
PY
}
run 1
if [ "$GPUS" -ge 2 ]; then run 2; else echo "[gpu-check] one GPU: the 2-GPU NCCL training is skipped"; fi
