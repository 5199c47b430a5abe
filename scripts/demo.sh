#!/usr/bin/env bash
# The demo: obtain MovieLens-100K (or fall back to synthetic-retrieval), prepare it, and train the funnel
# recipe (README, "The funnel recipe"): a two-tower on a copy whose val split labels the ranking data, the
# same two-tower on train + val (what is served), the ranking data from the first one's candidates, a DCN
# reading the user's history on it; then index the served two-tower and print user 1's top 10 (retrieval
# alone, then reranked; with titles), and say how to serve and browse them.
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
DATA="$OUT/$DATASET"
# the protocol copy (80/10/10), the labelling copy (val 30%) and the refit copy (val 0%): same seed, same test split
$RECSYS data prepare --dataset "$DATASET" --out "$DATA" --rows 100000 --overwrite
$RECSYS data prepare --dataset "$DATASET" --out "$DATA-label" --rows 100000 --val-frac 0.3 --overwrite >/dev/null
$RECSYS data prepare --dataset "$DATASET" --out "$DATA-refit" --rows 100000 --val-frac 0 --overwrite >/dev/null
# train a model; its MLflow run id (from the "MLflow run ID: ..." line) goes to stdout, all its output to
# stderr (not `tee /dev/stderr`: that truncates a log file the demo's stderr is redirected to)
train() {
  local out
  out=$(mktemp)
  $RECSYS train "$@" | tee "$out" >&2 || { rm -f "$out"; return 1; }
  sed -n 's/^MLflow run \([0-9a-f]*\):.*/\1/p' "$out"
  rm -f "$out"
}
echo "[demo] 1/3 the retrieval stage: a two-tower on the labelling copy, and the same on train + val (served)"
LABELLING=$(train --config configs/funnel-retrieval.yaml --data "$DATA-label" --experiment demo --run-name retrieval-label)
RETRIEVAL=$(train --config configs/funnel-retrieval.yaml --data "$DATA-refit" --experiment demo --run-name retrieval-refit)
echo "[demo] 2/3 the ranking data: the first two-tower's top 100 per user, labelled by the val split it did not train on"
$RECSYS data candidates --retrieval "$LABELLING" --data "$DATA-label" --serving-retrieval "$RETRIEVAL" \
  --out "$DATA-candidates" --candidates 100 --overwrite
echo "[demo] 3/3 the ranking stage: DCN reading the user's history, on those candidates"
RANKING=$(train --config configs/funnel-ranking.yaml --data "$DATA-candidates" --experiment demo --run-name ranking)
echo "[demo] indexing the served two-tower's item vectors (exact FAISS index, logged to run $RETRIEVAL)"
$RECSYS index --run-id "$RETRIEVAL" --index flat
USER_ID=1
if [ "$DATASET" != movielens-100k ]; then
  USER_ID=$(.venv/bin/python -c "import json; print(json.load(open('$DATA/vocab/user_id.json'))[0])")
fi
echo "[demo] top 10 for user $USER_ID, retrieval alone (two-tower, train and val items excluded)"
$RECSYS recommend --retrieval "$RETRIEVAL" --user "$USER_ID" --k 10 --candidates 100
echo "[demo] top 10 for user $USER_ID, the funnel: the ranker reorders the two-tower's 100 candidates"
$RECSYS recommend --retrieval "$RETRIEVAL" --ranking "$RANKING" --user "$USER_ID" --k 10 --candidates 100
echo "[demo] serve it: $RECSYS package --retrieval $RETRIEVAL --ranking $RANKING --register demo-recommender"
echo "[demo]           PATH=$(pwd)/.venv/bin:\$PATH mlflow models serve -m models:/demo-recommender/1 --env-manager local -h 127.0.0.1 -p 5001"
echo "[demo] browse the runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///$(pwd)/mlflow.db  (then open http://127.0.0.1:5000)"
