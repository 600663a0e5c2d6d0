"""LLM-side pruning with the KV cache equals the same pruned computation done without any cache:
a full forward of the unpatched model per step, with masks that hide the pruned keys from the layers
after each stage (a masking reference built here, independent of visprune's hooks)."""

from __future__ import annotations

import pytest
import torch

import visprune
from tests.models import tiny
from visprune.patch import _prepare

N_NEW = 5
LLM_METHODS = ["fastv", "sparsevlm", "dart", "pdrop", "knee+text", tiny.COMPOSITION[0]]
N_LAYERS = 4


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llava("eager")


@pytest.fixture(scope="module")
def inputs(model):
    return tiny.varied_batch(model)


def _layer_masks(prefill_mask: torch.Tensor, groups, total: int) -> list[torch.Tensor]:
    """Per decoder layer, a float [B, 1, T, T] mask over prefill + generated tokens: causal, padding
    hidden, and from each group's start layer on only that group's kept prefill tokens visible."""
    b, s = prefill_mask.shape
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    masks = []
    for layer in range(N_LAYERS):
        keys = prefill_mask.bool()
        for g in groups:
            if g.start_layer <= layer:
                kept = torch.zeros(b, s, dtype=torch.bool)
                kept.scatter_(1, g.index, g.valid)
                keys = kept
        keys = torch.cat([keys, torch.ones(b, total - s, dtype=torch.bool)], dim=1)
        allowed = (keys[:, None, None, :] & causal) | torch.eye(total, dtype=torch.bool)
        masks.append(torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min))
    return masks


def _mask_hook(mask: torch.Tensor):
    def hook(module, args, kwargs):
        kwargs["attention_mask"] = mask
        return args, kwargs

    return hook


def _masking_reference(model, prefill_embeds, prefill_mask, groups, n_new):
    """Greedy decoding with full forwards (use_cache=False) of the UNPATCHED model."""
    layers = model.model.language_model.layers
    embed = model.get_input_embeddings()
    b, s, _ = prefill_embeds.shape
    tokens = torch.empty(b, 0, dtype=torch.long)
    steps = []
    for _ in range(n_new):
        total = s + tokens.shape[1]
        embeds = torch.cat([prefill_embeds, embed(tokens)], dim=1)
        mask2d = torch.cat([prefill_mask, torch.ones_like(tokens)], dim=1)
        positions = (mask2d.cumsum(-1) - 1).clamp(min=0)
        masks = _layer_masks(prefill_mask, groups, total)

        handles = [
            layer.register_forward_pre_hook(_mask_hook(mask), with_kwargs=True)
            for layer, mask in zip(layers, masks, strict=True)
        ]
        try:
            with torch.no_grad():
                logits = model(
                    inputs_embeds=embeds, attention_mask=mask2d, position_ids=positions, use_cache=False
                ).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        steps.append(logits)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens, steps


@pytest.mark.parametrize("method", LLM_METHODS, ids=tiny.method_id)
def test_cached_generation_equals_masking_reference(model, inputs, method):
    handle = tiny.apply_method(model, method)
    try:
        out = tiny.greedy(model, inputs, N_NEW)
        groups = list(handle.pruner.state.groups)
        tokens_per_layer = handle.stats.tokens_per_layer
        with torch.no_grad():
            batch = _prepare(
                handle, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"), None, None
            )
    finally:
        visprune.remove(model)
    stage_layers = handle.pruner.stage_layers
    assert [g.start_layer for g in groups] == list(stage_layers)

    # The kept sets: every real text token stays, pruned tokens are image tokens, sets are nested.
    real = batch.attention_mask.bool()
    visual = batch.layout.visual
    previous = real
    for g in groups:
        kept = torch.zeros_like(real).scatter_(1, g.index, g.valid)
        assert not (kept & ~previous).any()
        assert ((real & ~visual) <= kept).all()
        assert (kept & visual).sum() < (previous & visual).sum()
        previous = kept

    # tokens_per_layer: the real count before the first stage, each group's count from its layer on.
    for b in range(3):
        want = []
        for layer in range(N_LAYERS):
            active = [g for g in groups if g.start_layer <= layer]
            want.append(int(active[-1].valid[b].sum()) if active else int(real[b].sum()))
        assert tokens_per_layer[b] == want
        for layer in stage_layers:
            assert tokens_per_layer[b][layer] < tokens_per_layer[b][layer - 1]

    ref_tokens, ref_logits = _masking_reference(model, batch.inputs_embeds, batch.attention_mask, groups, N_NEW)
    width = inputs["input_ids"].shape[1]
    assert out.sequences[:, width:].tolist() == ref_tokens.tolist()
    for got, want in zip(out.logits, ref_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_masking_reference_sees_the_pruning(model, inputs):
    """The reference is not vacuous: without the groups' masks it gives other logits."""
    handle = tiny.apply_method(model, "fastv")
    try:
        out = tiny.greedy(model, inputs, 2)
        groups = list(handle.pruner.state.groups)
        with torch.no_grad():
            batch = _prepare(handle, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], None, None)
    finally:
        visprune.remove(model)
    _, dense = _masking_reference(model, batch.inputs_embeds, batch.attention_mask, [], 1)
    _, pruned = _masking_reference(model, batch.inputs_embeds, batch.attention_mask, groups, 1)
    torch.testing.assert_close(out.logits[0], pruned[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.logits[0], dense[0], rtol=1e-3, atol=1e-3)


def test_two_calls_reset_the_pruner(model, inputs):
    """A second generate on other inputs prunes its own prefill (no state leaks between calls)."""
    handle = tiny.apply_method(model, "pdrop")
    try:
        tiny.greedy(model, inputs, 2)
        first = handle.stats.tokens_per_layer
        one = tiny.select(inputs, 1)
        alone = tiny.greedy(model, one, N_NEW)
        assert handle.stats.tokens_per_layer == [first[1]]
        again = tiny.greedy(model, inputs, N_NEW)
        assert handle.stats.tokens_per_layer == first
    finally:
        visprune.remove(model)
    assert again.sequences[1, -N_NEW:].tolist() == alone.sequences[0, -N_NEW:].tolist()


def test_consecutive_stage_layers_read_their_own_signals(model, inputs):
    """sparsevlm layers (1, 2): stage 0 prunes at layer 2 with layer 1's scores (so it keeps what a
    one-stage run keeps) and stage 1's scores are read at layer 2 from the pruned sequence. (Regression:
    layer 2's collection used to overwrite stage 0's signals, and stage 1 then found none.)"""
    kept = []
    for layers, counts in (((1, 2), (24, 10)), ((1,), (24,))):
        handle = visprune.apply(model, "sparsevlm", layers=layers, keep_counts=counts)
        try:
            tiny.greedy(model, inputs, 1)
            kept.append(handle.pruner.state.groups)
        finally:
            visprune.remove(model)
    two, one = kept
    assert [g.start_layer for g in two] == [2, 3] and [g.start_layer for g in one] == [2]
    assert torch.equal(two[0].index, one[0].index) and torch.equal(two[0].valid, one[0].valid)
    assert (two[1].valid.sum(1) < two[0].valid.sum(1)).all()


@pytest.mark.parametrize("method", ["fastv", "pdrop", "sparsevlm", "knee+text"])
def test_query_row_hint_gives_the_same_pruning_as_full_queries(model, method):
    """Methods declare which query rows they read; computing only those must not change what is kept."""
    inputs = tiny.make_inputs(model, [2, 7, 11], seed=5)
    kept = {}
    for full in (False, True):
        handle = tiny.apply_method(model, method)
        handle.pruner.full_q = full
        try:
            with torch.no_grad():
                out = model(**inputs)
            kept[full] = ([g.index.clone() for g in handle.pruner.state.groups], out.logits)
        finally:
            visprune.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(kept[False][0], kept[True][0], strict=True))
    torch.testing.assert_close(kept[False][1], kept[True][1])
