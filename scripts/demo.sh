#!/usr/bin/env bash
# The demo: obtain MovieLens-100K (or fall back to synthetic-retrieval), prepare it, print its summary.
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
echo "[demo] prepared dataset in $OUT/$DATASET (inspect again with: $RECSYS data summary $OUT/$DATASET)"
