#!/usr/bin/env bash
# Create (or reuse) .venv with visprune and its dev tools installed. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# CPU build of torch (the pinned wheel is available offline on the project's machines); any torch >= 2.1 works.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
