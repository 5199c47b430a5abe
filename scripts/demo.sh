#!/usr/bin/env bash
# The demo: obtain MovieLens-100K (or fall back to synthetic-retrieval), prepare it, train a two-tower
# model and a DLRM on it locally, print their test metrics, index the two-tower's items and print one
# user's recommendations (retrieve, rerank; with titles), and say how to serve and browse them.
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
# train a model; its MLflow run id (from the "MLflow run ID: ..." line) goes to stdout, all its output to
# stderr (not `tee /dev/stderr`: that truncates a log file the demo's stderr is redirected to)
train() {
  local out
  out=$(mktemp)
  $RECSYS train "$@" | tee "$out" >&2 || { rm -f "$out"; return 1; }
  sed -n 's/^MLflow run \([0-9a-f]*\):.*/\1/p' "$out"
  rm -f "$out"
}
echo "[demo] training a two-tower retrieval model on $DATASET"
RETRIEVAL=$(train --config configs/two-tower-movielens.yaml --data "$OUT/$DATASET" --experiment demo \
  --run-name two-tower-demo --max-epochs 8)
echo "[demo] training a DLRM ranking model on $DATASET"
RANKING=$(train --config configs/dlrm-movielens.yaml --data "$OUT/$DATASET" --experiment demo \
  --run-name dlrm-demo --max-epochs 4)
echo "[demo] indexing the two-tower's item vectors (exact FAISS index, logged to run $RETRIEVAL)"
$RECSYS index --run-id "$RETRIEVAL" --index flat
USER_ID=$(.venv/bin/python -c "import json; print(json.load(open('$OUT/$DATASET/vocab/user_id.json'))[0])")
echo "[demo] top 10 for user $USER_ID: two-tower retrieves 200 candidates (seen items excluded), DLRM reranks them"
$RECSYS recommend --retrieval "$RETRIEVAL" --ranking "$RANKING" --user "$USER_ID" --k 10 --candidates 200
echo "[demo] serve it: $RECSYS package --retrieval $RETRIEVAL --ranking $RANKING --register demo-recommender"
echo "[demo]           PATH=$(pwd)/.venv/bin:\$PATH mlflow models serve -m models:/demo-recommender/1 --env-manager local -h 127.0.0.1 -p 5001"
echo "[demo] browse the runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///$(pwd)/mlflow.db  (then open http://127.0.0.1:5000)"
