#!/usr/bin/env bash
# The whole test run (what CI runs): the full suite on the newest supported transformers, then the
# model-integration suite (tests/models) on the oldest supported one, then the lmms-eval plugin tests
# (tests/lmms) with the lmms extra installed. Creates the three environments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest tests
bash scripts/setup.sh --oldest
.venv-oldest/bin/python -m pytest tests/models
bash scripts/setup.sh --lmms
# Offline, as the plugin must work; a missing lmms-eval fails these tests here instead of skipping them.
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 VISPRUNE_REQUIRE_LMMS=1 .venv-lmms/bin/python -m pytest tests/lmms
