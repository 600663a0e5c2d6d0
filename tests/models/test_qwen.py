"""The Qwen-VL family through the adapter contract (tiny random-weight models, CPU): the dense path is
the model's own computation, every method runs batched exactly as one by one on images of different
sizes, kept tokens keep their dense M-RoPE positions and decoding continues after them."""

from __future__ import annotations

import pytest
import torch

import visprune
from tests.models import tiny_qwen
from tests.models.tiny import METHOD_OPTIONS

GRIDS = [(1, 8, 8), (1, 6, 10), None, (1, 10, 6)]  # 16, 15, no image, 15 merged tokens
LENGTHS = [2, 7, 4, 11]
N_NEW = 4
QWEN_OPTIONS = {
    **METHOD_OPTIONS,
    "fastervlm": {"budget": 4},
    "divprune": {"budget": 4},
    "vispruner": {"budget": 4},
    "vtc-cls": {"budget": 4, "start_layer": -2},
    "visionzip": {"dominant": 3, "contextual": 1},
    "tome": {"budget": 4},
    "random": {"budget": 4},
    "pool": {"budget": 4},
    "knee": {"k_min": 2},
    "knee+text": {"k_min": 2, "text_layer": 2},
    "sparsevlm": {"layers": (1, 2), "keep_counts": (8, 4)},
    "dart": {"layer": 2, "budget": 4},
    "flowcut": {"budget": 4},
}


@pytest.fixture(scope="module", params=tiny_qwen.FAMILIES)
def model(request):
    return tiny_qwen.tiny_qwen(request.param)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_qwen.make_inputs(model, GRIDS, LENGTHS, seed=3)


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, **kw)


def test_dense_path_is_the_models_own(model, inputs):
    ref = _generate(model, inputs)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    handle = visprune.apply(model, "none")
    try:
        out = _generate(model, inputs)
        with torch.no_grad():
            logits = model(**inputs).logits
        position_map = handle.stats.position_map
    finally:
        visprune.remove(model)
    assert torch.equal(out, ref)
    real = position_map >= 0
    gathered = logits.gather(1, position_map.clamp(min=0)[..., None].expand(-1, -1, logits.shape[-1]))
    torch.testing.assert_close(gathered[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    assert handle.stats.visual_tokens_in == [16, 15, 15]


@pytest.mark.parametrize("method", list(QWEN_OPTIONS))
def test_batch_equals_one_by_one(model, inputs, method):
    handle = visprune.apply(model, method, **QWEN_OPTIONS[method])
    try:
        batched = _generate(model, inputs)
        counts = list(handle.stats.visual_tokens_out)
        alone, alone_counts = [], []
        for i in range(len(GRIDS)):
            alone.append(_generate(model, tiny_qwen.select(inputs, i, GRIDS))[0, -N_NEW:])
            alone_counts += handle.stats.visual_tokens_out
    finally:
        visprune.remove(model)
    assert batched[:, -N_NEW:].tolist() == [a.tolist() for a in alone]
    assert counts == alone_counts
    budget = QWEN_OPTIONS[method].get("budget")
    if budget is not None and visprune.get_method(method).placement.value == "encoder":
        assert counts == [budget] * 3


@pytest.mark.parametrize("method", ["random", "flowcut"])
def test_kept_tokens_keep_their_dense_mrope_positions(model, inputs, method):
    """Row 0 numbers the shorter sequence; rows 1-3 at each kept token equal the dense M-RoPE position of
    its placeholder; the first decoded token's positions follow the dense prompt's last position."""
    dense, _ = model.model.get_rope_index(
        inputs["input_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True
    )
    handle = visprune.apply(model, method, budget=4)
    try:
        _generate(model, inputs)
    finally:
        visprune.remove(model)
        hook.remove()
    prefill, first_step = seen[0], seen[1]
    assert prefill.shape[0] == 4
    image = 0
    for b, grid in enumerate(GRIDS):
        row, real = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        keep = real.clone()  # the caller's tokens that reach the LLM, in order
        if grid is not None:
            start = int((row == tiny_qwen.IMAGE).nonzero()[0])
            run = torch.arange(start, start + handle.stats.visual_tokens_in[image])
            keep[run] = False
            keep[start + handle.stats.reductions[image][0].kept] = True
            image += 1
        want = dense[:, b, keep]
        n = want.shape[1]
        assert torch.equal(prefill[1:, b, -n:], want), b
        assert torch.equal(prefill[0, b, -n:], torch.arange(n)), b
        assert torch.equal(first_step[1:, b, 0], dense[:, b, -1] + 1), b


def test_mismatched_videos_and_missing_grids_are_refused(model, inputs):
    """Video patches without video placeholders (Qwen3-VL: any video) and images without their grid."""
    visprune.apply(model, "random", budget=4)
    try:
        with pytest.raises(visprune.InputError, match=r"video placeholders|video inputs are not supported yet"):
            _generate(
                model,
                {**inputs, "pixel_values_videos": inputs["pixel_values"], "video_grid_thw": inputs["image_grid_thw"]},
            )
        no_grid = {k: v for k, v in inputs.items() if k != "image_grid_thw"}
        with pytest.raises(visprune.InputError, match="needs image_grid_thw"):
            _generate(model, no_grid)
    finally:
        visprune.remove(model)


def _deepstack_added(model, inputs, **apply_kw):
    """Per DeepStack level i, what visprune added to the hidden states after LLM layer i at prefill
    ([B, S', D]: the layer's output after the additions minus before), and the handle's stats."""
    layers = model.model.language_model.layers
    levels = len(model.model.visual.deepstack_merger_list)
    before, after = {}, {}

    def grab(store, i):
        def hook(module, args, out):
            store.setdefault(i, out.clone())

        return hook

    hooks = [layers[i].register_forward_hook(grab(before, i)) for i in range(levels)]
    handle = visprune.apply(model, **apply_kw)
    hooks += [layers[i].register_forward_hook(grab(after, i)) for i in range(levels)]
    try:
        _generate(model, inputs)
    finally:
        for h in hooks:
            h.remove()
        visprune.remove(model)
    return [after[i] - before[i] for i in range(levels)], handle.stats


def test_deepstack_features_reach_the_llm_reduced_with_the_kept_set():
    """Qwen3-VL: each DeepStack level is added after its LLM layer at the visual tokens only, and equals the
    model's own dense DeepStack features of the image at the kept indices (method 'random')."""
    model = tiny_qwen.tiny_qwen("qwen3-vl")
    inputs = tiny_qwen.make_inputs(model, GRIDS, LENGTHS, seed=3)
    with torch.no_grad():
        dense = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).deepstack_features
    added, stats = _deepstack_added(model, inputs, method="random", budget=4)
    assert len(added) == len(dense) == 2
    for level, rows in enumerate(added):
        image = 0
        for b, grid in enumerate(GRIDS):
            visual = rows[b].abs().sum(-1) > 0
            if grid is None:
                assert not visual.any()
                continue
            kept = stats.reductions[image][0].kept
            per_image = dense[level][image] if isinstance(dense[level], tuple) else None
            if per_image is None:  # transformers 5.17: one tensor per level for all images
                start = sum(stats.visual_tokens_in[:image])
                per_image = dense[level][start : start + stats.visual_tokens_in[image]]
            assert int(visual.sum()) == 4
            torch.testing.assert_close(rows[b][visual], per_image[kept], rtol=1e-5, atol=1e-5)
            image += 1


def test_layer_qk_applies_the_qwen3_qk_norms():
    """layer_qk gives a Qwen3 decoder layer's real queries and keys (q_norm / k_norm per head before RoPE):
    attention from them reproduces the layer's own attention output, and q_rows picks rows of the same q."""
    from visprune.models.decoder import layer_qk

    model = tiny_qwen.tiny_qwen("qwen3-vl")
    lm = model.model.language_model
    layer, attn = lm.layers[1], lm.layers[1].self_attn
    torch.manual_seed(0)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 7, 64)
        cos, sin = lm.rotary_emb(x, torch.arange(7).view(1, 1, -1).expand(3, 2, -1))
        q, k = layer_qk(layer, x, (cos, sin))
        normed = layer.input_layernorm(x)
        v = attn.v_proj(normed).view(2, 7, -1, attn.head_dim).transpose(1, 2)
        groups = attn.num_key_value_groups
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), is_causal=True
        )
        want, _ = attn(normed, position_embeddings=(cos, sin), attention_mask=None)
        rows = torch.tensor([[6], [3]])
        q_part, k_part = layer_qk(layer, x, (cos, sin), rows)
    torch.testing.assert_close(attn.o_proj(out.transpose(1, 2).reshape(2, 7, -1)), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_part, k)
    for b, r in enumerate(rows[:, 0].tolist()):
        torch.testing.assert_close(q_part[b, :, r], q[b, :, r])
