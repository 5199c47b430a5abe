#!/usr/bin/env bash
# Screenshot (PNG) of one MLflow run's page in the MLflow 3.17 web UI, taken with headless Chromium, for the
# docs: by default the run's Overview tab (Description, Metrics, Parameters, About, Datasets, Tags).
#   bash scripts/mlflow_screenshot.sh TRACKING_URI RUN_ID OUT.png [PORT]
#   e.g. bash scripts/mlflow_screenshot.sh sqlite:///mlflow.db 0123abcd docs/mlflow_run.png
# It starts `mlflow ui` bound to 127.0.0.1 only (on PORT, default a free one), waits for /health, looks the
# run's experiment up over the REST API, shoots http://.../#/experiments/EXP/runs/RUN and always stops the
# server on exit. mlflow is $MLFLOW_BIN, else .venv/bin/mlflow, else `mlflow` on PATH. If /usr/bin/chromium
# is missing, the script itself runs `apt-get update && apt-get install -y chromium` (needs root).
# Optional env: RUN_TAB shoots another tab, e.g. RUN_TAB=artifacts/figures/loss.png (a logged figure) or
# RUN_TAB=model-metrics (metric charts); WINDOW_SIZE (default 1600,1400); VIRTUAL_TIME_MS (default 60000:
# Chromium's virtual render budget, ~3 s of real time; under ~3000 the page is not drawn or Chromium hangs).
# The browser reaches the server as http://mlflow-ui:PORT (resolved to 127.0.0.1): on a localhost address
# the UI opens its Assistant side panel over a quarter of the page.
set -euo pipefail
die() { echo "mlflow_screenshot: $*" >&2; exit 1; }
[ $# -ge 3 ] || die "usage: $0 TRACKING_URI RUN_ID OUT.png [PORT]"
URI=$1 RUN=$2 OUT=$(realpath -m "$3")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MLFLOW=${MLFLOW_BIN:-$( [ -x "$ROOT/.venv/bin/mlflow" ] && echo "$ROOT/.venv/bin/mlflow" || command -v mlflow || true)}
[ -n "$MLFLOW" ] && [ -x "$MLFLOW" ] || die "no mlflow binary (set MLFLOW_BIN, or build .venv)"
PORT=${4:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [ ! -x /usr/bin/chromium ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || die "chromium is missing and 'apt-get install -y chromium' failed"
fi
TMP=$(mktemp -d)
setsid "$MLFLOW" ui --backend-store-uri "$URI" --host 127.0.0.1 --port "$PORT" --workers 1 \
  --allowed-hosts "127.0.0.1:$PORT,mlflow-ui:$PORT" --cors-allowed-origins "http://mlflow-ui:$PORT" >"$TMP/ui.log" 2>&1 &
UI=$!
trap 'kill -- -$UI 2>/dev/null || true; wait $UI 2>/dev/null || true; rm -rf "$TMP"' EXIT
BASE=http://127.0.0.1:$PORT
for _ in $(seq 240); do
  curl -sf "$BASE/health" >/dev/null && break
  kill -0 $UI 2>/dev/null || die "mlflow ui exited: $(tail -n1 "$TMP/ui.log")"
  sleep 0.5
done
curl -sf "$BASE/health" >/dev/null || die "mlflow ui did not answer on $BASE/health within 120 s"
EXP=$(curl -sf "$BASE/api/2.0/mlflow/runs/get?run_id=$RUN" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["info"]["experiment_id"])' 2>/dev/null) \
  || die "run $RUN not found in $URI"
URL="http://mlflow-ui:$PORT/#/experiments/$EXP/runs/$RUN${RUN_TAB:+/$RUN_TAB}?workflowType=machine_learning"
mkdir -p "$(dirname "$OUT")"; rm -f "$OUT"
timeout 180 /usr/bin/chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync --user-data-dir="$TMP/profile" \
  --host-resolver-rules="MAP mlflow-ui 127.0.0.1" --hide-scrollbars --window-size="${WINDOW_SIZE:-1600,1400}" \
  --virtual-time-budget="${VIRTUAL_TIME_MS:-60000}" --screenshot="$OUT" "$URL" >"$TMP/chromium.log" 2>&1 || true
[ -s "$OUT" ] || die "chromium wrote no screenshot of $URL ($(grep -v dbus "$TMP/chromium.log" | tail -n1))"
echo "$OUT"
