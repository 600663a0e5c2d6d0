#!/usr/bin/env bash
# The whole test run (what CI runs): the full suite on the newest supported transformers, then the
# model-integration suite (tests/models) on the oldest supported one. Creates both environments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest tests
bash scripts/setup.sh --oldest
.venv-oldest/bin/python -m pytest tests/models
