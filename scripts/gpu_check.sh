#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): one markdown table of cropi's device paths
# (projection kernel, POPI, bf16 ZeRO-3 step, NCCL weight sync, vLLM tests) on one
# H100/H200, within 8 minutes. Run it where a GPU is available; CI never runs it.
#
#   scripts/gpu_check.sh                 # all rows; the table also goes to $OUT/gpu_check.md if OUT is set
#   scripts/gpu_check.sh --rows a,b      # some rows
#   scripts/gpu_check.sh --dry-run       # imports and configs only (any machine)
#   scripts/gpu_check.sh --help
#
# Uses the project's virtual environment (.venv, from `make setup`) and installs
# nothing: the GPU machine must already have cropi's dependencies with a CUDA
# build of torch (and vLLM for row e). CROPI_PYTHON=/path/to/python uses another
# interpreter that has them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${CROPI_PYTHON:-.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
    echo "gpu_check: $PY not found: run 'make setup' first (it creates .venv)," \
         "or set CROPI_PYTHON to a python that has cropi installed" >&2
    exit 2
fi
if ! "$PY" -c 'import cropi, torch' 2>/dev/null; then
    echo "gpu_check: $PY cannot import cropi and torch: run 'make setup'" >&2
    exit 2
fi
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)' 2>/dev/null; then
    echo "gpu_check: warning: $PY has a CPU-only torch ($("$PY" -c 'import torch; print(torch.__version__)'));" \
         "the GPU rows will report 'no CUDA device'" >&2
fi

# No network on the GPU machines: never try the Hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# The rows share a 450 s budget (gpu_check.py --budget); this outer limit only guards the harness.
timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-475}" "$PY" scripts/gpu_check.py "$@"
