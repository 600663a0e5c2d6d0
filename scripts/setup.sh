#!/usr/bin/env bash
# Create (or reuse) a virtual environment with visprune and its dev tools installed. Safe to run repeatedly.
#   bash scripts/setup.sh            -> .venv: the newest torch / transformers inside pyproject's tested range
#   bash scripts/setup.sh --oldest   -> .venv-oldest: transformers pinned to the range's lower bound
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
extra=()
if [ "${1:-}" = "--oldest" ]; then
  venv=.venv-oldest
  # The lower bound of the declared range, read from pyproject.toml (one source of truth).
  oldest=$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
  [ -n "$oldest" ] || { echo "setup.sh: no 'transformers>=X,<Y' range in pyproject.toml" >&2; exit 1; }
  extra=("transformers==$oldest")
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/setup.sh [--oldest]" >&2
  exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# CPU build of torch (the pinned wheel is available offline on the project's machines).
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -e ".[dev]" "${extra[@]}"
"$venv/bin/python" -c "import torch, transformers; print(f'$venv: torch {torch.__version__}, transformers {transformers.__version__}')"
