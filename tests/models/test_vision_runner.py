"""The vision tower runs only as far as someone needs: LLaVA reads hidden_states[-2], so the last
encoder layer never runs; CLS signals of the last layer come from its q/k projections alone."""

import pytest
import torch

import visprune
from tests.models import tiny


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.mark.parametrize(("method", "options"), [("none", {}), ("prumerge", {}), ("fastervlm", {"budget": 8})])
def test_last_encoder_layer_is_not_run(model, method, options):
    layers = model.model.vision_tower.encoder.layers
    calls = {"last_layer": 0, "last_q_proj": 0}
    hooks = [
        layers[-1].register_forward_hook(lambda *_: calls.__setitem__("last_layer", calls["last_layer"] + 1)),
        layers[-1].self_attn.q_proj.register_forward_hook(
            lambda *_: calls.__setitem__("last_q_proj", calls["last_q_proj"] + 1)
        ),
    ]
    inputs = tiny.make_inputs(model, [3])
    visprune.apply(model, method, **options)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        visprune.remove(model)
        for h in hooks:
            h.remove()
    assert calls["last_layer"] == 0
    # PruMerge scores with the last layer's q/k (on its input) without running the layer itself.
    assert calls["last_q_proj"] == (1 if method == "prumerge" else 0)


def test_unpatched_model_runs_every_layer(model):
    """Control: the plain HF path does run the last layer, so the test above can tell the difference."""
    layers = model.model.vision_tower.encoder.layers
    seen = []
    hook = layers[-1].register_forward_hook(lambda *_: seen.append(1))
    try:
        with torch.no_grad():
            model(**tiny.make_inputs(model, [3]))
    finally:
        hook.remove()
    assert seen
