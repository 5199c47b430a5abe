#!/usr/bin/env bash
# Create ./.venv with the pinned stack. Idempotent: skips work when the stamp matches.
#   RECSYS_CUDA=1  install fbgemm-gpu (CUDA kernels) instead of fbgemm-gpu-cpu; auto-detected
#                  when `nvidia-smi` lists a GPU. RECSYS_CUDA=0 forces the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv
if [ -z "${RECSYS_CUDA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then RECSYS_CUDA=1; else RECSYS_CUDA=0; fi
fi
FBGEMM=fbgemm-gpu-cpu==1.9.0
[ "$RECSYS_CUDA" = "1" ] && FBGEMM=fbgemm-gpu==1.9.0
stamp="$(cat constraints.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$FBGEMM"
if [ -f "$VENV/.stamp" ] && [ "$(cat "$VENV/.stamp")" = "$stamp" ]; then
  exit 0
fi
echo "[setup] building $VENV ($FBGEMM); this takes a few minutes the first time" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOG="$VENV/setup.log"
: > "$LOG"
pip_install() {  # quiet unless it fails: pip's resolver notes and index warnings go to the log
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" >>"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    echo "[setup] pip install $* failed (full log: $LOG)" >&2
    exit 1
  fi
}
pip_install -U "pip>=24" setuptools wheel
# 1. torch first (a CUDA build that also runs on CPU), 2. FBGEMM kernels, 3. torchrec without deps.
pip_install -c constraints.txt torch torchvision
pip_install -c constraints.txt "$FBGEMM"
pip_install --no-deps -c constraints.txt torchrec
# 4. the project and the rest of the stack, held to the lock.
pip_install -c constraints.txt -e ".[dev]"
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, streaming, lightning, ray, mlflow, pyspark, faiss, pymilvus, milvus_lite" \
  || { echo "[setup] import check failed" >&2; exit 1; }
echo "$stamp" > "$VENV/.stamp"
echo "[setup] ready: $VENV" >&2
