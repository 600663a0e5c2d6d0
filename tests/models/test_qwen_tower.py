"""visprune's Qwen-VL tower runner: batched segment attention equals one attention call per segment, the
runner's dense features equal the stock tower's, and `tower_layer` reduces inside the tower (blocks after
the cut see only the kept tokens, batch equals one by one, errors are clear)."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
import torch.nn.functional as F

import visprune
from tests.models import tiny_qwen
from tests.models.test_qwen import QWEN_OPTIONS
from tests.models.tiny import tiny_llava
from visprune import compat
from visprune.methods import Placement, get_method
from visprune.models import adapter_for, qwen_tower
from visprune.models.segments import Segments, segment_attention, segment_attention_lse

# Odd grids: windows of several sizes on Qwen2.5-VL, a two-frame entry (video-like t=2).
GRIDS = [(1, 6, 10), (2, 4, 4), (1, 10, 6), (1, 8, 8)]


# segment lengths that take each of segment_attention's plans: one length, a few, many (padded)
EVERY_PLAN = pytest.mark.parametrize(
    "lengths",
    [(8, 8, 8), (3, 5, 3, 7, 5), (1, 2, 3, 4, 5, 6, 7)],
    ids=["uniform", "grouped", "padded"],
)


def _one_call_per_segment(q, k, v, lengths, scale):
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True):
        folded = [x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs)]
        outs.append(F.scaled_dot_product_attention(*folded, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


@EVERY_PLAN
@pytest.mark.parametrize("eager", [False, True])
def test_segment_attention_equals_one_call_per_segment(lengths, eager):
    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q, k, v = (torch.randn(t, 2, 8, generator=g) for _ in range(3))
    out = segment_attention(q, k, v, Segments(lengths), scale=0.3, eager=eager)
    torch.testing.assert_close(out, _one_call_per_segment(q, k, v, lengths, 0.3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lengths", [(8, 8, 8), (3, 5, 3, 7, 5)], ids=["uniform", "grouped"])
@pytest.mark.parametrize("eager", [False, True])
def test_segment_attention_returns_each_rows_log_normaliser(lengths, eager):
    """With the log-normalisers (what the CLS-free signal reuses): the same attention, and per token and
    head log sum_j exp(q k_j * scale) over the keys of its own segment."""
    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q, k, v = (torch.randn(t, 2, 8, generator=g) for _ in range(3))
    out, lse = segment_attention_lse(q, k, v, Segments(lengths), scale=0.3, eager=eager)
    torch.testing.assert_close(out, _one_call_per_segment(q, k, v, lengths, 0.3), rtol=1e-5, atol=1e-6)
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    ref = torch.cat(
        [torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]).mul(0.3).logsumexp(-1).T for a, b in itertools.pairwise(bounds)]
    )
    assert lse is not None and lse.dtype == torch.float32
    torch.testing.assert_close(lse, ref, rtol=1e-5, atol=1e-5)


def test_segment_attention_has_no_log_normaliser_for_a_padded_layout():
    """Many distinct lengths run as one masked call, whose kernel gives no normalisers: None, not a guess."""
    lengths = (1, 2, 3, 4, 5, 6, 7)
    q = torch.randn(sum(lengths), 2, 8)
    out, lse = segment_attention_lse(q, q, q, Segments(lengths), scale=0.3)
    assert lse is None
    torch.testing.assert_close(out, segment_attention(q, q, q, Segments(lengths), scale=0.3))


@EVERY_PLAN
@pytest.mark.parametrize("eager", [False, True])
def test_masked_keys_take_no_part_in_the_attention(lengths, eager):
    """q and k widened by a key bias (`TowerState.mask`): every row attends over its segment's unmasked keys
    only, as if the masked rows were gone; a segment of masked keys alone still gives finite rows (they are
    pruned rows, whose outputs nobody reads); bias 0 everywhere is the plain attention."""
    g = torch.Generator().manual_seed(1)
    t = sum(lengths)
    q, k, v = (torch.randn(t, 2, 8, generator=g) for _ in range(3))
    attended = torch.rand(t, generator=g) > 0.4
    attended[: lengths[0]] = False  # the first segment's keys all masked
    bias = torch.where(attended, 0.0, qwen_tower.KEY_BIAS)
    out = segment_attention(*qwen_tower.widen(q, k, bias), v, Segments(lengths), scale=0.3, eager=eager)
    assert out.shape == v.shape and torch.isfinite(out).all()
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    for a, b in itertools.pairwise(bounds):
        keys = attended[a:b]
        if keys.any():
            folded = [x.transpose(0, 1).unsqueeze(0) for x in (q[a:b], k[a:b][keys], v[a:b][keys])]
            want = F.scaled_dot_product_attention(*folded, scale=0.3)[0].transpose(0, 1)
            torch.testing.assert_close(out[a:b], want, rtol=1e-5, atol=1e-6)
    plain = segment_attention(q, k, v, Segments(lengths), scale=0.3, eager=eager)
    zero = segment_attention(*qwen_tower.widen(q, k, torch.zeros(t)), v, Segments(lengths), scale=0.3, eager=eager)
    torch.testing.assert_close(zero, plain)


def test_segments_refuse_a_sequence_they_do_not_cover():
    q = torch.zeros(5, 1, 4)
    with pytest.raises(ValueError, match="cover 6 tokens"):
        segment_attention(q, q, q, Segments((3, 3)), scale=1.0)


def test_aligned_gated_mlp_equals_the_mlp():
    """The GPU path for Qwen2.5-VL's 3420-wide MLP (stacked gate/up, zero-padded down), here on an MLP of
    odd width on the CPU: the same function."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

    from visprune.models.qwen_tower import aligned_gated_mlp

    config = tiny_qwen.tiny_qwen2_5_vl().config.vision_config
    config.intermediate_size = 30
    torch.manual_seed(0)
    mlp = Qwen2_5_VLMLP(config, bias=True)
    x = torch.randn(7, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(aligned_gated_mlp(mlp, x), mlp(x), rtol=1e-5, atol=1e-6)


def _pixels(model, grids, seed=0):
    vc = model.config.vision_config
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), width, generator=g), torch.tensor(grids)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", tiny_qwen.FAMILIES)
def test_runner_features_equal_the_stock_tower(family, attn):
    model = tiny_qwen.tiny_qwen(family, attn)
    pixels, grid = _pixels(model, GRIDS)
    with torch.no_grad():
        stock = model.model.visual(pixels, grid_thw=grid)
        tokens = adapter_for(model).image_tokens(pixels, None, {"image_grid_thw": grid})
    torch.testing.assert_close(torch.cat(tokens.features), stock.pooler_output, rtol=1e-5, atol=1e-5)
    if family == "qwen3-vl":
        levels = torch.cat(tokens.extras["deepstack"])  # [U, L, D]
        for i, level in enumerate(stock.deepstack_features):
            torch.testing.assert_close(levels[:, i], level, rtol=1e-5, atol=1e-5)


TOWER_METHODS = {"fastervlm": {"budget": 5}, "random": {"budget": 5}, "tome": {"budget": 5}}
BATCH_GRIDS = [(1, 8, 8), (1, 6, 10), None, (1, 10, 6)]
LENGTHS = [2, 7, 4, 11]
# The cut: after Qwen2.5-VL's first full-attention block (1), after both of Qwen3-VL's DeepStack blocks.
CUT = {"qwen2-vl": 2, "qwen2.5-vl": 3, "qwen3-vl": 2}


@pytest.fixture(scope="module", params=tiny_qwen.FAMILIES)
def family_model(request):
    return request.param, tiny_qwen.tiny_qwen(request.param)


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("method", list(TOWER_METHODS))
def test_tower_layer_batch_equals_one_by_one(family_model, method):
    family, model = family_model
    inputs = tiny_qwen.make_inputs(model, BATCH_GRIDS, LENGTHS, seed=3)
    visprune.apply(model, method, tower_layer=CUT[family], **TOWER_METHODS[method])
    try:
        batch = _generate(model, inputs)
        alone = [_generate(model, tiny_qwen.select(inputs, i, BATCH_GRIDS)) for i in range(len(BATCH_GRIDS))]
    finally:
        visprune.remove(model)
    for i, out in enumerate(alone):
        assert batch[i, -4:].tolist() == out[0, -4:].tolist(), f"prompt {i}"


def test_remove_after_tower_layer_restores_the_model_exactly(family_model):
    family, model = family_model
    inputs = tiny_qwen.make_inputs(model, BATCH_GRIDS, LENGTHS, seed=3)
    with torch.no_grad():
        before = model(**inputs).logits
    visprune.apply(model, "tome", tower_layer=CUT[family], budget=5)
    with torch.no_grad():
        model(**inputs)
    visprune.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__


def test_blocks_after_the_cut_run_on_the_kept_tokens_only(family_model):
    family, model = family_model
    inputs = tiny_qwen.make_inputs(model, BATCH_GRIDS, LENGTHS, seed=3)
    blocks = model.model.visual.blocks
    rows: dict[int, int] = {}
    hooks = [
        b.mlp.register_forward_pre_hook(lambda m, a, i=i: rows.__setitem__(i, a[0].shape[0]))
        for i, b in enumerate(blocks)
    ]
    handle = visprune.apply(model, "fastervlm", tower_layer=CUT[family], budget=5)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        visprune.remove(model)
        for h in hooks:
            h.remove()
    dense = 4 * sum(handle.stats.visual_tokens_in)
    assert handle.stats.visual_tokens_out == [5, 5, 5]
    assert [rows[i] for i in range(len(blocks))] == [dense] * CUT[family] + [4 * 15] * (len(blocks) - CUT[family])


def test_a_masked_block_runs_torchs_attention_under_any_implementation(monkeypatch):
    """FlashAttention's varlen path takes no key bias: a masked block (FlowCut's) runs the runner's own
    attention whatever the model's implementation, with the same result as under sdpa."""
    model = tiny_qwen.tiny_qwen("qwen2.5-vl")
    inputs = tiny_qwen.make_inputs(model, [(1, 8, 8), (1, 6, 10)], [2, 3], seed=1)
    grids = [tuple(row) for row in inputs["image_grid_thw"].tolist()]
    state = adapter_for(model)._start(inputs["pixel_values"], grids)
    state.mask(torch.rand(state.hidden.shape[0] // 4, generator=torch.Generator().manual_seed(0)) > 0.3)
    block = model.model.visual.blocks[0]
    args = (state.hidden, state.cos, state.sin, state.layout.segments(0), compat.vision_rope(block.attn))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return qwen_tower.run_block(block, *args, qwen_tower.EAGER_STEPS, key_bias=state.key_bias)

    sdpa = run()
    monkeypatch.setattr(block.attn.config, "_attn_implementation", "flash_attention_2")
    monkeypatch.setattr(block, "forward", lambda *a, **k: pytest.fail("the block's own attention path ran"))
    assert torch.equal(run(), sdpa)


def test_tower_layer_kept_tokens_attend_among_themselves():
    """Qwen2-VL (full attention per image): after the cut, the kept rows go through the stock blocks as a
    shorter packed sequence would (the reference runs transformers' own blocks on the kept rows)."""
    model = tiny_qwen.tiny_qwen("qwen2-vl")
    tower, cut = model.model.visual, 2
    pixels, grid = _pixels(model, [(1, 6, 10), (1, 8, 8)])
    seen = {}
    hook = tower.blocks[cut].register_forward_pre_hook(
        lambda m, a, kw: seen.update(hidden=a[0], kw=kw), with_kwargs=True
    )
    with torch.no_grad():
        tower(pixels, grid_thw=grid)
    hook.remove()
    handle = visprune.apply(model, "fastervlm", tower_layer=cut, budget=4)
    try:
        with torch.no_grad():
            tokens = handle.adapter.image_tokens(pixels, _reducer(handle), {"image_grid_thw": grid})
    finally:
        visprune.remove(model)
    offsets = [0, 15]
    units = torch.cat([r[0].sources.sort().values + o for r, o in zip(tokens.reductions, offsets, strict=True)])
    patches = (units[:, None] * 4 + torch.arange(4)).flatten()
    hidden = seen["hidden"][patches]
    cos, sin = (x[patches] for x in seen["kw"]["position_embeddings"])
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    with torch.no_grad():
        for block in tower.blocks[cut:]:
            hidden = block(hidden, cu_seqlens=cu, position_embeddings=(cos, sin))
        ref = tower.merger(hidden)
    assert all(bool((r[0].sources.diff() > 0).all()) for r in tokens.reductions)  # spatial order
    torch.testing.assert_close(torch.cat(tokens.features), ref, rtol=1e-5, atol=1e-5)


def test_qwen3_deepstack_levels_on_both_sides_of_the_cut():
    """Cut between the DeepStack blocks (0 | 1): level 0 comes from before the cut, so a selection keeps the
    dense level-0 rows of the kept tokens; level 1 is computed on the kept tokens after the cut. Batch ==
    alone."""
    model = tiny_qwen.tiny_qwen("qwen3-vl")
    pixels, grid = _pixels(model, [(1, 6, 10), (1, 8, 8)])
    with torch.no_grad():
        dense = adapter_for(model).image_tokens(pixels, None, {"image_grid_thw": grid}).extras["deepstack"]
    handle = visprune.apply(model, "random", tower_layer=1, budget=6)
    try:
        with torch.no_grad():
            tokens = handle.adapter.image_tokens(pixels, _reducer(handle), {"image_grid_thw": grid})
            alone = handle.adapter.image_tokens(pixels[60:], _reducer(handle), {"image_grid_thw": grid[1:]})
    finally:
        visprune.remove(model)
    for i, (levels, crops) in enumerate(zip(tokens.extras["deepstack"], tokens.reductions, strict=True)):
        torch.testing.assert_close(levels[:, 0], dense[i][crops[0].sources, 0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(levels[:, 1], dense[i][crops[0].sources, 1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tokens.extras["deepstack"][1], alone.extras["deepstack"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens.features[1], alone.features[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [s.name for s in visprune.list_methods() if s.placement is Placement.ENCODER])
def test_every_encoder_method_reduces_inside_the_tower_or_says_why(method):
    model = tiny_qwen.tiny_qwen("qwen2-vl")
    inputs = tiny_qwen.make_inputs(model, [(1, 8, 8), (1, 6, 10)], [3, 4], seed=3)
    options = QWEN_OPTIONS.get(method, {})
    spec = get_method(method)
    if method == "flowcut":  # prunes inside the tower at blocks of its own schedule
        with pytest.raises(visprune.UnsupportedModelError, match="apply it without tower_layer"):
            visprune.apply(model, method, tower_layer=2, **options)
        return
    if any(r.kind == "projected" for r in spec.signals(spec.options(**options)).values()):  # LLM-space tokens
        with pytest.raises(visprune.UnsupportedModelError, match="without tower_layer"):
            visprune.apply(model, method, tower_layer=2, **options)
        return
    attempts = [options, {**options, "extra_token": False}] if method.startswith("prumerge") else [options]
    for i, opts in enumerate(attempts):
        handle = visprune.apply(model, method, tower_layer=2, **opts)
        try:
            with torch.no_grad():
                if len(attempts) > 1 and i == 0:  # the default keeps a summary token at no grid cell
                    with pytest.raises(visprune.UnsupportedModelError, match="extra_token=False"):
                        model(**inputs)
                    continue
                model(**inputs)
        finally:
            visprune.remove(model)
        assert all(0 < out < n for out, n in zip(handle.stats.visual_tokens_out, [16, 15], strict=True))


def _reducer(handle):
    from visprune.reducer import Reducer

    return Reducer(handle.encoder, handle.encoder_options, False, handle.stats, handle.tower_layer)


def test_tower_layer_errors():
    llava = tiny_llava()
    with pytest.raises(visprune.UnsupportedModelError, match="Qwen-VL family"):
        visprune.apply(llava, "fastervlm", tower_layer=2, budget=4)
    model = tiny_qwen.tiny_qwen("qwen2.5-vl")
    with pytest.raises(visprune.InputError, match=r"tower_layer must be an int in \[1, 3\]"):
        visprune.apply(model, "fastervlm", tower_layer=4, budget=4)
    with pytest.raises(visprune.InputError, match="needs an encoder-side method"):
        visprune.apply(model, "fastv", tower_layer=2)
    with pytest.raises(
        visprune.UnsupportedModelError, match=r"at vision block\(s\) \[-2\], but tower_layer=1 leaves 1"
    ):
        visprune.apply(model, "fastervlm", tower_layer=1, budget=4)
    assert getattr(model, "_visprune", None) is None
    inputs = tiny_qwen.make_inputs(model, BATCH_GRIDS, LENGTHS, seed=3)
    visprune.apply(model, "prumerge", tower_layer=3)
    try:
        with pytest.raises(visprune.UnsupportedModelError, match="summary tokens"):
            model(**inputs)
    finally:
        visprune.remove(model)


@pytest.mark.parametrize("family", tiny_qwen.FAMILIES)
def test_compiled_tower_equals_the_stock_tower(family, monkeypatch):
    """compile_tower traces every block into one graph per half (fullgraph: no breaks) and changes no
    result: generation with a cut equals the plain runner's, features equal the stock tower's. Traced
    with torch.compile's aot_eager backend, which needs no C compiler; inductor is checked below."""
    from torch._dynamo.utils import counters

    from visprune.models import qwen_tower

    monkeypatch.setattr(qwen_tower, "COMPILE_BACKEND", "aot_eager")
    model = tiny_qwen.tiny_qwen(family)
    pixels, grid = _pixels(model, GRIDS)
    inputs = tiny_qwen.make_inputs(model, BATCH_GRIDS, LENGTHS, seed=3)
    visprune.apply(model, "tome", tower_layer=CUT[family], budget=5)
    try:
        plain = _generate(model, inputs)
    finally:
        visprune.remove(model)
    handle = visprune.apply(model, "tome", tower_layer=CUT[family], budget=5, compile_tower=True)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = _generate(model, inputs)
        assert counters["stats"]["unique_graphs"] == 2  # one per half for all blocks and token counts
        with torch.no_grad():
            tokens = handle.adapter.image_tokens(pixels, None, {"image_grid_thw": grid})
            stock = model.model.visual(pixels, grid_thw=grid).pooler_output
    finally:
        visprune.remove(model)
    assert compiled.tolist() == plain.tolist()
    torch.testing.assert_close(torch.cat(tokens.features), stock, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's inductor needs a C compiler on the CPU")
def test_compiled_block_steps_with_inductor_equal_the_plain_ones():
    """The fused kernels inductor generates compute the stock block arithmetic (float32, CPU), with one
    graph for blocks of every token count."""
    from visprune import compat
    from visprune.models import qwen_tower

    torch._dynamo.reset()
    tower = tiny_qwen.tiny_qwen("qwen2.5-vl").model.visual
    steps = qwen_tower.compiled_steps("inductor")
    rope = compat.vision_rope(tower.blocks[0].attn)
    width, heads = tower.blocks[0].attn.qkv.in_features, tower.blocks[0].attn.num_heads
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tokens, block in zip((24, 40), tower.blocks, strict=False):
            hidden = torch.randn(tokens, width, generator=g)
            cos, sin = (torch.randn(tokens, width // heads, generator=g) for _ in range(2))
            plain = qwen_tower.attention_inputs(block, hidden, cos, sin, rope)
            for ours, ref in zip(steps.attention_inputs(block, hidden, cos, sin, rope), plain, strict=True):
                torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
            out = plain[2]
            ref = qwen_tower.finish_block(block, hidden, out)
            torch.testing.assert_close(steps.finish_block(block, hidden, out), ref, rtol=1e-5, atol=1e-5)


def test_compile_tower_errors():
    with pytest.raises(visprune.UnsupportedModelError, match="compile_tower is not supported for Llava"):
        visprune.apply(tiny_llava(), "fastervlm", budget=4, compile_tower=True)
    model = tiny_qwen.tiny_qwen("qwen2-vl")
    with pytest.raises(visprune.InputError, match="compile_tower must be True or False"):
        visprune.apply(model, "fastervlm", budget=4, compile_tower="yes")
    assert getattr(model, "_visprune_handle", None) is None  # nothing was patched


def test_a_block_read_by_several_layers_is_scored_once(monkeypatch):
    """vtc-cls's layers -4..-2 of the tiny Qwen2.5-VL tower all map to full-attention block 1: its
    mean-received signal is computed once, not once per layer."""
    from visprune.models.qwen2_vl import Qwen2VLAdapter

    model = tiny_qwen.tiny_qwen("qwen2.5-vl")
    pixels, grid = _pixels(model, GRIDS)
    scored = []
    original = Qwen2VLAdapter._signal
    monkeypatch.setattr(
        Qwen2VLAdapter, "_signal", lambda self, block, *a: scored.append(block) or original(self, block, *a)
    )
    handle = visprune.apply(model, "vtc-cls", budget=3, start_layer=-4)
    try:
        with torch.no_grad():
            tokens = handle.adapter.image_tokens(pixels, _reducer(handle), {"image_grid_thw": grid})
    finally:
        visprune.remove(model)
    assert scored == [model.model.visual.blocks[1]]
    assert [len(f) for f in tokens.features] == [3] * len(GRIDS)


def test_the_tower_plan_is_reused_for_the_same_grids(monkeypatch):
    """The host-side plan (layout, position ids, RoPE angles) is made once per grid list and reused:
    a repeated call does no host planning and gives the same features; other grids get their own plan."""
    from visprune import compat

    model = tiny_qwen.tiny_qwen("qwen2.5-vl")
    planned = []
    original = compat.vision_position_ids
    monkeypatch.setattr(compat, "vision_position_ids", lambda *a: planned.append(1) or original(*a))
    adapter = adapter_for(model)
    pixels, grid = _pixels(model, GRIDS)
    other, other_grid = _pixels(model, GRIDS[:2])
    with torch.no_grad():
        first = adapter.image_tokens(pixels, None, {"image_grid_thw": grid}).features
        again = adapter.image_tokens(pixels, None, {"image_grid_thw": grid}).features
        adapter.image_tokens(other, None, {"image_grid_thw": other_grid})
        stock = model.model.visual(pixels, grid_thw=grid).pooler_output
    assert len(planned) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    torch.testing.assert_close(torch.cat(again), stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["keys", "mean_received"])
def test_signals_from_the_runners_own_q_and_k_equal_recomputed_ones(kind):
    """A signal reads the q / k (and pre-RoPE keys) the runner kept for the block; recomputing them from
    the block's input gives the same signal."""
    from dataclasses import replace

    from visprune.methods import SignalRequest
    from visprune.models import qwen_tower

    model = tiny_qwen.tiny_qwen("qwen2.5-vl")
    adapter = adapter_for(model)
    pixels, grid = _pixels(model, GRIDS)
    with torch.no_grad():
        state = adapter._start(pixels, [tuple(g) for g in grid.tolist()])
        inputs, _ = qwen_tower.run_blocks(adapter.vision_tower, state, 2, inputs={1})
        seen = inputs[1]
        assert seen.q is not None and seen.keys is not None
        req = SignalRequest(kind, layers=(1,), heads="mean")
        block = adapter.vision_tower.blocks[1]
        kept = adapter._signal(block, seen, req)
        recomputed = adapter._signal(block, replace(seen, q=None, k=None, keys=None, lse=None), req)
    torch.testing.assert_close(kept, recomputed, rtol=1e-5, atol=1e-6)


def test_the_runner_keeps_the_log_normalisers_of_a_block_a_signal_reads():
    """The runner records the block's attention normalisers [T, heads] (tower order) with its q and k, and
    the mean-received signal computed from them equals the one that runs its own first pass."""
    from visprune.methods.signals import _received_fused, _split_heads
    from visprune.models import qwen_tower

    model = tiny_qwen.tiny_qwen("qwen2.5-vl")
    adapter = adapter_for(model)
    pixels, grid = _pixels(model, GRIDS)
    full = sorted(adapter.vision_tower.fullatt_block_indexes)[0]
    with torch.no_grad():
        state = adapter._start(pixels, [tuple(g) for g in grid.tolist()])
        inputs, _ = qwen_tower.run_blocks(adapter.vision_tower, state, full + 1, inputs={full})
    seen = inputs[full]
    assert seen.lse is not None and seen.lse.shape == seen.q.shape[:2]
    scale = adapter.vision_tower.blocks[full].attn.scaling
    bounds = seen.segments.cu_seqlens().tolist()
    for a, b in itertools.pairwise(bounds):  # each image's own keys
        ref = torch.einsum("qhd,khd->hqk", seen.q[a:b], seen.k[a:b]).mul(scale).logsumexp(-1).T
        torch.testing.assert_close(seen.lse[a:b], ref, rtol=1e-5, atol=1e-5)
        qh, kh = (_split_heads(x[a:b].flatten(1)[None], x.shape[1]) for x in (seen.q, seen.k))
        reused = _received_fused(qh, kh, 0, seen.lse[a:b].T[None])
        torch.testing.assert_close(reused, _received_fused(qh, kh, 0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "options", "with_normalisers"), [("flowcut", {"budget": 4}, False), ("fastervlm", {"budget": 4}, True)]
)
def test_blocks_record_normalisers_only_for_signals_that_read_them(method, options, with_normalisers, monkeypatch):
    """FlowCut reads q, k and v at every block but no attention normaliser: its blocks run the plain attention
    call; the CLS-free signal's block returns its normalisers with the attention."""
    from visprune.models import qwen_tower

    model = tiny_qwen.tiny_qwen("qwen2.5-vl")
    pixels, grid = _pixels(model, GRIDS)
    calls = []
    original = qwen_tower.segment_attention_lse
    monkeypatch.setattr(qwen_tower, "segment_attention_lse", lambda *a, **k: calls.append(1) or original(*a, **k))
    handle = visprune.apply(model, method, **options)
    try:
        with torch.no_grad():
            tokens = handle.adapter.image_tokens(pixels, _reducer(handle), {"image_grid_thw": grid})
    finally:
        visprune.remove(model)
    assert bool(calls) == with_normalisers
    assert [len(f) for f in tokens.features] == [4] * len(GRIDS)
