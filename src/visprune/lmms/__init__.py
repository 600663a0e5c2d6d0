"""visprune as an lmms-eval model (the `lmms` extra: `pip install "visprune[lmms]"`).

lmms-eval finds the model through the `lmms_eval.models` entry point, which names `manifest` below;
`lmms-eval --model visprune --model_args pretrained=...,method=...` then loads `visprune.lmms.model`.
Only that module (and `manifest`, when lmms-eval calls it) imports lmms_eval, so the core library and
the rest of this package import without it. `visprune.lmms.synth_task` is the synthetic suite as a
local lmms-eval task (`visprune lmms-task` writes it).
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "visprune"
MODEL_CLASS = "visprune.lmms.model.VisPrune"


def manifest() -> Any:
    """lmms-eval's ModelManifest for visprune's model (called by lmms-eval's registry at import)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
