#!/usr/bin/env bash
# The demo: obtain MovieLens-100K (or fall back to synthetic-retrieval), prepare it, train a two-tower
# model and a DLRM on it locally, print their test metrics and how to open the runs in MLflow.
set -euo pipefail
cd "$(dirname "$0")/.."
RECSYS=.venv/bin/recsys
OUT=data/demo
mkdir -p "$OUT"
if $RECSYS data download movielens-100k; then
  DATASET=movielens-100k
else
  echo "[demo] MovieLens-100K could not be obtained; using synthetic-retrieval instead" >&2
  DATASET=synthetic-retrieval
fi
$RECSYS data prepare --dataset "$DATASET" --out "$OUT/$DATASET" --rows 100000 --overwrite
echo "[demo] training a two-tower retrieval model on $DATASET"
$RECSYS train --config configs/two-tower-movielens.yaml --data "$OUT/$DATASET" --experiment demo \
  --run-name two-tower-demo --max-epochs 8
echo "[demo] training a DLRM ranking model on $DATASET"
$RECSYS train --config configs/dlrm-movielens.yaml --data "$OUT/$DATASET" --experiment demo \
  --run-name dlrm-demo --max-epochs 4
echo "[demo] browse both runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///$(pwd)/mlflow.db  (then open http://127.0.0.1:5000)"
