"""The plugin tests: offline (set before anything imports huggingface_hub or datasets), and lmms-eval either
present or, where VISPRUNE_REQUIRE_LMMS=1 (scripts/test.sh in the lmms environment, i.e. CI), a failure."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="visprune-lmms-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
os.environ.setdefault("WANDB_MODE", "disabled")

REQUIRED = os.environ.get("VISPRUNE_REQUIRE_LMMS") == "1"


@pytest.fixture(scope="session")
def lmms_eval():
    """The lmms_eval module; without it the test skips, or fails where VISPRUNE_REQUIRE_LMMS=1."""
    if importlib.util.find_spec("lmms_eval") is None:
        message = 'lmms-eval is not installed (pip install "visprune[lmms]"; bash scripts/setup.sh --lmms)'
        if REQUIRED:
            pytest.fail(f"VISPRUNE_REQUIRE_LMMS=1 but {message}")
        pytest.skip(message)
    import lmms_eval

    return lmms_eval
