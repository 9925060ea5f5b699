#!/usr/bin/env bash
# The lent GPU's whole run in one command (bench/gpu_run.py says what it does):
#   bash bench/gpu_run.sh [OUT_DIR] [gpu_run.py options]      OUT_DIR defaults to $OUT
# The GPU machine runs the checkout uninstalled, with its own python3 (torch with CUDA): the repository root
# on PYTHONPATH makes `import gptmini` this checkout's code. PYTHON picks another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
out=()
if [[ $# -gt 0 && $1 != -* ]]; then
  out=(--out-dir "$1")
  shift
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" bench/gpu_run.py ${out[@]+"${out[@]}"} "$@"
