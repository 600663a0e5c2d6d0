"""LLM-side methods with a count rule (`MethodSpec.visual_kept`: fastv, pdrop, dart, sparsevlm) prune without
reading the device: the decoder pruner plans each stage's sequence from the host's token counts. The result
must be the one the keep mask's own counts give, and a rule that disagrees with its method must raise."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import visprune
from tests.models import tiny, tiny_qwen
from visprune.errors import VisPruneError
from visprune.llm_pruning import DecoderPruner

RULED = ["fastv", "pdrop", "dart", "sparsevlm"]


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny.varied_batch(model)


def _forward(model, inputs, method, **extra):
    handle = tiny.apply_method(model, method, **extra)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, handle.stats.tokens_per_layer
    finally:
        visprune.remove(model)


@pytest.mark.parametrize("method", [*RULED, "composition"])
def test_planned_on_the_host_equals_read_from_the_device(model, inputs, method, monkeypatch):
    plans = []
    plan = DecoderPruner._plan_on_host
    monkeypatch.setattr(
        DecoderPruner, "_plan_on_host", lambda self, stage: plans.append(plan(self, stage)) or plans[-1]
    )
    name = tiny.COMPOSITION[0] if method == "composition" else method
    extra = tiny.COMPOSITION[1] if method == "composition" else {}
    planned = _forward(model, inputs, name, **extra)
    assert plans and all(p is not None for p in plans)  # every stage was planned on the host
    monkeypatch.setattr(DecoderPruner, "_plan_on_host", lambda self, stage: None)  # read from the device
    read = _forward(model, inputs, name, **extra)
    assert torch.equal(planned[0], read[0])
    assert planned[1] == read[1]


def test_generate_with_beams_plans_the_expanded_rows(model, inputs):
    """generate repeats each prompt's rows for beam search: the host's counts follow."""
    one = tiny.select(inputs, 2)
    outs = []
    for host in (True, False):
        handle = tiny.apply_method(model, "pdrop")
        if not host:
            handle.pruner.begin = lambda layout, real=None, visual=None, begin=handle.pruner.begin, **_: begin(
                layout, real
            )
        try:
            with torch.no_grad():
                outs.append(model.generate(**one, max_new_tokens=3, num_beams=2, do_sample=False))
        finally:
            visprune.remove(model)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "rule", [lambda present, options, stage: present, lambda present, options, stage: present // 4]
)
def test_a_rule_that_disagrees_with_its_method_raises(model, inputs, rule):
    """Planning more tokens than the mask keeps, or fewer (the slots then must not leave the sequence), ends
    in visprune's error at the end of the prefill, not in a wrong result or an indexing crash."""
    handle = tiny.apply_method(model, "fastv")
    try:
        handle.pruner.spec = replace(handle.pruner.spec, visual_kept=rule)
        with pytest.raises(VisPruneError, match="disagree"), torch.no_grad():
            model(**inputs)
    finally:
        visprune.remove(model)


@pytest.mark.parametrize("family", tiny_qwen.FAMILIES)
def test_planned_on_the_host_on_the_qwen_family(family, monkeypatch):
    model = tiny_qwen.tiny_qwen(family)
    inputs = tiny_qwen.make_inputs(model, [(1, 8, 8), (1, 6, 10)], [3, 6], seed=5)
    results = []
    for host in (True, False):
        if not host:
            monkeypatch.setattr(DecoderPruner, "_plan_on_host", lambda self, stage: None)
        visprune.apply(model, "fastv", layer=2)
        try:
            with torch.no_grad():
                results.append(model(**inputs).logits)
        finally:
            visprune.remove(model)
    assert torch.equal(results[0], results[1])
