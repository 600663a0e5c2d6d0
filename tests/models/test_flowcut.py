"""flowcut inside the CLIP tower: the runner's progressive pruning equals a per-image reference written
from the formula (float64 scores, explicit token lists, no padding), a batch equals its images alone
although they keep different counts on the way, and the method runs through apply on LLaVA and is
refused where it does not apply. On the Qwen-VL family (whole merge units, no CLS): the tower's kept
units, features and DeepStack levels equal a per-image reference that runs the stock blocks on the kept
patches, a budget of every unit is the dense model, and the errors. (Batch == alone, cache, sdpa ==
eager and M-RoPE positions on Qwen-VL: flowcut is in the parametrised suites of test_qwen*.py.)"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import visprune
from tests.methods.test_flowcut import reference_count
from tests.models import tiny, tiny_qwen
from tests.models.graph_standin import ReplayOnCPU
from visprune.methods import SignalRequest, graphs
from visprune.models import qwen_tower, vision
from visprune.reducer import Reducer

TARGET = 6


@pytest.fixture(scope="module")
def model():
    cfg = tiny.tiny_llava_config()
    cfg.vision_config.num_hidden_layers = 6  # hidden_states[-2] = index 5: prunes after layers 1 (2 left) and 3
    model = tiny.build(LlavaForConditionalGeneration, cfg, "sdpa", 0)
    tower = model.model.vision_tower
    with torch.no_grad():  # sharper attention than random weights give, so that images prune differently
        for layer in getattr(tower, "vision_model", tower).encoder.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return model


def project(linear, rows: torch.Tensor, heads: int) -> torch.Tensor:
    """A linear projection in float64, split into heads: [T, H, d]."""
    return (rows @ linear.weight.double().T + linear.bias.double()).view(rows.shape[0], heads, -1)


def reference(model, pixels: torch.Tensor, target: int) -> tuple[torch.Tensor, list[int], int]:
    """One image: (feature rows [T, C], kept patch indices, patches kept after the first pruning layer)."""
    tower = model.model.vision_tower
    body = getattr(tower, "vision_model", tower)  # transformers 5 keeps the parts on the model itself
    layers = body.encoder.layers
    h = body.pre_layrnorm(body.embeddings(pixels[None]))
    kept = list(range(h.shape[1] - 1))
    flow, first = None, None
    plan = {3: 0, 1: 2}
    for index in range(5):
        layer = layers[index]
        if index <= 3:
            attn = layer.self_attn
            x = layer.layer_norm1(h)[0].double()
            heads, d = attn.num_heads, x.shape[1] // attn.num_heads
            q, k, v = (
                project(lin, rows, heads) for lin, rows in ((attn.q_proj, x[:1]), (attn.k_proj, x), (attn.v_proj, x))
            )
            a = torch.stack([((k[:, i] @ q[0, i]) * d**-0.5).softmax(0) for i in range(heads)]).mean(0)[1:]
            s = torch.stack([(v[:, i] @ v[0, i]).softmax(0) for i in range(heads)]).mean(0)[1:]
            value = v.mean(1)[1:].abs().sum(1)
            score = (a / a.sum() + s / s.sum()) * value
            flow = score if flow is None else (flow + score) / 2
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
        if index in plan:
            count = reference_count(a.tolist(), target, plan[index])
            order = sorted(sorted(range(len(kept)), key=lambda i: (-float(flow[i]), i))[:count])
            h = torch.cat([h[:, :1], h[:, 1:][:, order]], dim=1)
            kept, flow = [kept[i] for i in order], flow[order]
            first = count if first is None else first
    return h[0, 1:], kept, first


def encode(model, pixels: torch.Tensor, target: int = TARGET):
    with torch.no_grad():
        return vision.encode(
            model.model.vision_tower, pixels, -2, "default", {"kept": SignalRequest("flowcut", keep=target)}
        )


def test_runner_equals_the_per_image_reference_and_batch_equals_alone(model, monkeypatch):
    pixels = tiny.varied_pixels(model, 3)
    counts = []
    real = vision.prune_counts
    monkeypatch.setattr(vision, "prune_counts", lambda *a: counts.append(real(*a)) or counts[-1])
    out = encode(model, pixels)
    assert out.patches == 64 and out.features.shape == (3, TARGET, 32)
    firsts = []
    for i in range(3):
        with torch.no_grad():
            feats, kept, first = reference(model, pixels[i], TARGET)
        firsts.append(first)
        assert out.signals["kept"][i].tolist() == kept
        torch.testing.assert_close(out.features[i], feats, rtol=1e-4, atol=1e-5)
        alone = encode(model, pixels[i : i + 1])
        assert torch.equal(alone.signals["kept"][0], out.signals["kept"][i])
        torch.testing.assert_close(alone.features[0], out.features[i], rtol=1e-5, atol=1e-6)
    assert counts[0].tolist() == firsts
    assert len(set(firsts)) > 1  # the images kept different counts: the padded path ran
    assert all(TARGET < c < 64 for c in firsts)


@pytest.fixture
def cpu_graphs(monkeypatch, model):
    """`graphs.replayed` capturing and replaying on the CPU stand-in of a CUDA graph, which fails a host read
    and a replay that reads a tensor other than its inputs, what it made itself and the tower's weights;
    yields the list of captures."""
    captures = []
    tower = model.model.vision_tower

    def capture(loop, inputs, static):
        buffers = [t.clone() for t in inputs]
        weights = {t.untyped_storage().data_ptr() for t in [*tower.parameters(), *tower.buffers()]}
        graph = ReplayOnCPU(lambda: loop(*buffers, **static), lambda: weights)
        graph.inputs = buffers
        captures.append(loop.__name__)
        return graph, buffers, graph.output

    graphs.clear()
    monkeypatch.setattr(graphs, "_replayable", lambda inputs: not ReplayOnCPU.running)
    monkeypatch.setattr(graphs, "_capture", capture)
    yield captures
    graphs.clear()


def test_the_tower_pass_is_replayed_from_a_graph_captured_once_per_shape_and_weights(model, cpu_graphs):
    """The pass reads nothing on the host (a capture would fail), so it is captured once per batch shape and
    replayed for new images, giving what the pass computes; the tower's weights moved (a new dtype) make a
    new capture; where autograd would record the pass, it runs as written."""
    pixels, other = tiny.varied_pixels(model, 3), tiny.varied_pixels(model, 4)[1:]
    plain = [vision._flowcut_tower(p, tower=model.model.vision_tower, feature=5, keep=TARGET) for p in (pixels, other)]
    for p, want in zip((pixels, other, pixels), (*plain, plain[0]), strict=True):
        got = encode(model, p)
        assert torch.equal(got.signals["kept"], want[1]) and torch.equal(got.features, want[0])
    assert cpu_graphs == ["_flowcut_tower"]
    encode(model, pixels[:2])
    assert len(cpu_graphs) == 2
    tower = model.model.vision_tower
    try:
        tower.double()
        doubled = encode(model, pixels.double())
        assert len(cpu_graphs) == 3 and doubled.features.dtype == torch.float64
        assert torch.equal(doubled.signals["kept"], plain[0][1])
    finally:
        tower.float()
    with torch.enable_grad():
        traced = vision.encode(tower, pixels, -2, "default", {"kept": SignalRequest("flowcut", keep=TARGET)})
    assert traced.features.requires_grad and len(cpu_graphs) == 3


def test_apply_generates_batch_equal_alone_and_removes_exactly(model):
    inputs = tiny.make_inputs(model, [3, 8, 5], seed=4)
    inputs["pixel_values"] = tiny.varied_pixels(model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = visprune.apply(model, "flowcut", budget=TARGET)
    try:
        batched = tiny.greedy(model, inputs, 3).sequences[:, -3:]
        alone = torch.cat([tiny.greedy(model, tiny.select(inputs, i), 3).sequences[:, -3:] for i in range(3)])
    finally:
        visprune.remove(model)
    assert torch.equal(batched, alone)
    assert handle.stats.visual_tokens_in == [64] and handle.stats.visual_tokens_out == [TARGET]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "_visprune_handle")


def test_budget_larger_than_the_patches_is_refused(model):
    with pytest.raises(visprune.InputError, match="budget=65 exceeds the N=64 patches"):
        encode(model, tiny.varied_pixels(model, 1), 65)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (tiny.tiny_llava_next, "flowcut is for LLaVA-1.5-class models"),
        (tiny.tiny_llava_siglip, "has no CLS token"),
    ],
)
def test_refused_where_it_does_not_apply(build, match):
    other = build()
    with pytest.raises(visprune.UnsupportedModelError, match=match):
        visprune.apply(other, "flowcut", budget=4)
    assert not hasattr(other, "_visprune_handle")


def test_refused_for_several_feature_layers():
    cfg = tiny.tiny_llava_config()
    cfg.vision_feature_layer = [-3, -2]
    other = tiny.build(LlavaForConditionalGeneration, cfg, "sdpa", 0)
    with pytest.raises(visprune.UnsupportedModelError, match="several"):
        visprune.apply(other, "flowcut", budget=4)
    assert not hasattr(other, "_visprune_handle")


# Qwen-VL: images of three sizes (16, 15, 15 merged tokens), 4 kept.
QWEN_GRIDS = [(1, 8, 8), (1, 6, 10), (1, 10, 6)]
QWEN_TARGET = 4


# 8-block towers: pruning points after blocks 1, 3, 5 (and 7), so the units masked at one are removed at the
# next (the 3- and 4-block towers of tiny_qwen have one pruning point before the last block)
DEEP = {"depth": 8}
DEEP_WINDOWS = {"depth": 8, "fullatt_block_indexes": [3, 7]}


def sharp_qwen(family: str, deep: bool = False):
    """A tiny Qwen-VL model whose mean query attends sharply (a large query bias, scaled keys), so that the
    entropy-driven counts prune mid-tower and differently per image (random weights attend nearly uniformly).
    deep: an 8-block tower."""
    model = tiny_qwen.tiny_qwen(family, **((DEEP_WINDOWS if family == "qwen2.5-vl" else DEEP) if deep else {}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            qkv, width = block.attn.qkv, block.attn.qkv.in_features
            qkv.bias[:width] += 8 * torch.randn(width, generator=g)
            qkv.weight[width : 2 * width].mul_(8)
    return model


def qwen_pixels(model, grids, seed=0):
    vc = model.config.vision_config
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    g = torch.Generator().manual_seed(seed)
    patches = [
        torch.randn(t * h * w, width, generator=g) + torch.linspace(-1, 1, t * h * w)[:, None] for t, h, w in grids
    ]
    return torch.cat(patches), torch.tensor(grids)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The vision RoPE on [T, H, d] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


def qwen_reference(model, pixels: torch.Tensor, grid: torch.Tensor, target: int):
    """One image, written from the formula: (kept natural units ascending, the merger's rows [K, D] and the
    DeepStack rows [K, L, D] of the kept units, the units kept after the first pruning block). The stock
    tower's own first-block input, RoPE angles and attention windows are captured from a stock forward;
    then block by block: float64 scores from the block's q, k (RoPE) and v, the stock block on the units
    still kept, a cut after the blocks with an even number of blocks left."""
    tower = model.model.visual
    blocks = tower.blocks
    seen = {}
    hooks = [
        b.register_forward_pre_hook(lambda m, a, kw, i=i: seen.setdefault(i, (a[0], kw)) and None, with_kwargs=True)
        for i, b in enumerate(blocks)
    ]
    with torch.no_grad():
        tower(pixels, grid_thw=grid)
    for h in hooks:
        h.remove()
    hidden, kw = seen[0]
    cos, sin = kw["position_embeddings"]
    n = hidden.shape[0] // 4
    full = set(getattr(tower, "fullatt_block_indexes", range(len(blocks))))
    windowed = [i for i in range(len(blocks)) if i not in full]
    if windowed:  # Qwen2.5-VL: the units in window order, and each one's window
        from visprune import compat

        units = compat.vision_windows(tower, grid)[0]
        bounds = seen[windowed[0]][1]["cu_seqlens"]
        window = torch.bucketize(torch.arange(n) * 4, bounds[1:], right=True)
    else:
        units, window = torch.arange(n), torch.zeros(n, dtype=torch.long)
    indexes, mergers = (getattr(tower, name, []) for name in ("deepstack_visual_indexes", "deepstack_merger_list"))
    levels = dict(zip(indexes, mergers, strict=True))
    saved, flow, first = {}, None, None
    for i, block in enumerate(blocks):
        attn = block.attn
        heads = attn.num_heads
        x = block.norm1(hidden).double()
        q, k, v = (x @ attn.qkv.weight.double().T + attn.qkv.bias.double()).view(x.shape[0], 3, heads, -1).unbind(1)
        q, k = rope(q, cos.double(), sin.double()), rope(k, cos.double(), sin.double())
        mean_q = q.mean(0)  # [H, d]
        a = torch.stack([(k[:, h] @ mean_q[h] * q.shape[-1] ** -0.5).softmax(0) for h in range(heads)], 1).mean(1)
        score = a * v.mean(1).abs().sum(-1)
        unit_a, unit_score = a.view(-1, 4).sum(1), score.view(-1, 4).sum(1)
        flow = unit_score if flow is None else (flow + unit_score) / 2
        if i in full:
            cu = torch.tensor([0, hidden.shape[0]], dtype=torch.int32)
        else:
            sizes = torch.unique_consecutive(window, return_counts=True)[1] * 4
            cu = torch.cat([torch.zeros(1, dtype=torch.int32), sizes.cumsum(0).int()])
        with torch.no_grad():
            hidden = block(hidden, cu_seqlens=cu, position_embeddings=(cos, sin))
            if i in levels:
                saved[i] = (levels[i](hidden), units.clone())
        left = len(blocks) - 1 - i
        if left % 2 == 0:
            count = reference_count(unit_a.tolist(), target, left)
            ranked = sorted(range(len(units)), key=lambda j: (-float(flow[j]), int(units[j])))[:count]
            keep = torch.tensor(sorted(ranked))  # tower order
            rows = (keep[:, None] * 4 + torch.arange(4)).flatten()
            hidden, cos, sin = hidden[rows], cos[rows], sin[rows]
            units, window, flow = units[keep], window[keep], flow[keep]
            first = count if first is None else first
    order = units.argsort()
    with torch.no_grad():
        merged = tower.merger(hidden)[order]
    final = units[order]
    deep = [rows[(final[:, None] == were[None]).int().argmax(1)] for rows, were in saved.values()]
    return final, merged, torch.stack(deep, 1) if deep else None, first


def qwen_tokens(model, pixels, grid, **options):
    handle = visprune.apply(model, "flowcut", **options)
    try:
        reducer = Reducer(handle.encoder, handle.encoder_options, False, handle.stats)
        with torch.no_grad():
            return handle.adapter.image_tokens(pixels, reducer, {"image_grid_thw": grid})
    finally:
        visprune.remove(model)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("family", tiny_qwen.FAMILIES)
def test_qwen_tower_equals_the_per_image_reference_on_the_kept_patches(family, deep):
    """Batched over images of three sizes that keep different counts mid-tower: each image's kept units,
    merged rows and DeepStack rows equal the per-image reference (stock blocks on the kept patches only,
    from the block after each pruning point; visprune masks them first and removes them later)."""
    model = sharp_qwen(family, deep)
    pixels, grid = qwen_pixels(model, QWEN_GRIDS)
    tokens = qwen_tokens(model, pixels, grid, budget=QWEN_TARGET)
    assert [r[0].count for r in tokens.reductions] == [QWEN_TARGET] * 3
    firsts, start = [], 0
    for i, (t, h, w) in enumerate(QWEN_GRIDS):
        image = pixels[start : start + t * h * w]
        start += t * h * w
        kept, merged, levels, first = qwen_reference(model, image, grid[i : i + 1], QWEN_TARGET)
        firsts.append(first)
        assert tokens.reductions[i][0].sources.tolist() == kept.tolist(), i
        torch.testing.assert_close(tokens.features[i], merged, rtol=1e-4, atol=1e-5)
        if levels is not None:
            torch.testing.assert_close(tokens.extras["deepstack"][i], levels, rtol=1e-4, atol=1e-5)
    assert all(QWEN_TARGET < f < n for f, n in zip(firsts, [16, 15, 15], strict=True))  # pruned mid-tower
    if family != "qwen3-vl" and not deep:
        assert len(set(firsts)) > 1  # images kept different counts on the way (ragged)


def test_qwen_blocks_that_keep_no_q_k_v_give_the_same_terms(monkeypatch):
    """Where the runner keeps no q, k, v of a block (FlashAttention's unmasked blocks run the block's own
    varlen call), FlowCut's terms compute them from the block's input: the same kept units and features as
    with the runner's own (unwidened there, where the runner's are widened by the key mask)."""
    model = sharp_qwen("qwen2.5-vl")
    pixels, grid = qwen_pixels(model, QWEN_GRIDS)
    want = qwen_tokens(model, pixels, grid, budget=QWEN_TARGET)
    run_block = qwen_tower.run_block

    def keeping_nothing(*args, **kwargs):
        out = run_block(*args, **kwargs)
        record = inspect.signature(run_block).bind(*args, **kwargs).arguments.get("record")
        if record is not None:
            record.q = record.k = record.keys = record.v = record.lse = None
        return out

    monkeypatch.setattr(qwen_tower, "run_block", keeping_nothing)
    got = qwen_tokens(model, pixels, grid, budget=QWEN_TARGET)
    for i in range(len(QWEN_GRIDS)):
        assert got.reductions[i][0].sources.tolist() == want.reductions[i][0].sources.tolist(), i
        torch.testing.assert_close(got.features[i], want.features[i])


def test_qwen_pruned_units_are_masked_at_once_and_removed_after_a_read_two_blocks_later(monkeypatch):
    """The host never waits for the block it just launched: a pruning point masks the units it drops (the next
    blocks run on every row, the dropped ones masked), and its result reaches the host two blocks later,
    at the next pruning point, where the masked rows are removed. The selection is the reference's
    (`test_qwen_tower_equals_the_per_image_reference_on_the_kept_patches`)."""
    from visprune.models import qwen2_vl, qwen_tower

    events = []
    run_block = qwen_tower.run_block

    def recorded_block(block, hidden, *args):
        key_bias = args[-1]
        masked = 0 if key_bias is None else int((key_bias != 0).sum()) // 4
        events.append(("block", hidden.shape[0] // 4, masked))
        return run_block(block, hidden, *args)

    class RecordedRead(qwen2_vl.StagedRead):
        def __init__(self, tensor):
            events.append(("staged", int((~tensor).sum())))
            super().__init__(tensor)

        def value(self):
            events.append(("read",))
            return super().value()

    monkeypatch.setattr(qwen_tower, "run_block", recorded_block)
    monkeypatch.setattr(qwen2_vl, "StagedRead", RecordedRead)
    model = sharp_qwen("qwen2.5-vl", deep=True)
    pixels, grid = qwen_pixels(model, QWEN_GRIDS)
    qwen_tokens(model, pixels, grid, budget=QWEN_TARGET)
    blocks = [e for e in events if e[0] == "block"]
    assert len(blocks) == 8
    staged = [i for i, e in enumerate(events) if e[0] == "staged"]  # after blocks 1, 3 and 5
    reads = [i for i, e in enumerate(events) if e[0] == "read"]  # after blocks 3 and 5
    assert [sum(e[0] == "block" for e in events[:i]) for i in staged] == [2, 4, 6]
    assert [sum(e[0] == "block" for e in events[:i]) for i in reads] == [4, 6]
    units = [e[1] for e in blocks]
    masked = [e[2] for e in blocks]
    assert masked[:2] == [0, 0] and masked[2] == events[staged[0]][1] > 0  # masked from the next block on
    assert units[:4] == [46] * 4  # every row runs until the read
    for read in (3, 5):  # the read after block `read` removes the rows masked in that block
        assert units[read + 1] == units[read] - masked[read]
    assert units[-1] < 46


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qwen_on_a_gpu_equals_the_cpu():
    """The masked blocks, the copies to the host that do not wait and the removal of masked rows on a GPU
    (float32): the same kept units and features as on the CPU."""
    model = sharp_qwen("qwen2.5-vl", deep=True)
    pixels, grid = qwen_pixels(model, QWEN_GRIDS)
    cpu = qwen_tokens(model, pixels, grid, budget=QWEN_TARGET)
    model.cuda()
    try:
        gpu = qwen_tokens(model, pixels.cuda(), grid, budget=QWEN_TARGET)
    finally:
        model.cpu()
    for a, b in zip(cpu.reductions, gpu.reductions, strict=True):
        assert a[0].sources.tolist() == b[0].sources.tolist()
    for a, b in zip(cpu.features, gpu.features, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])  # windows; DeepStack (Qwen2-VL: test_qwen.py)
def test_qwen_generate_batch_equals_alone_and_remove_restores(family):
    model = sharp_qwen(family)
    grids, lengths = [(1, 8, 8), (1, 6, 10), None, (1, 10, 6)], [2, 7, 4, 11]
    inputs = tiny_qwen.make_inputs(model, grids, lengths, seed=3)
    with torch.no_grad():
        before = model(**inputs).logits
    handle = visprune.apply(model, "flowcut", budget=QWEN_TARGET)
    try:
        with torch.no_grad():
            batch = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
            counts = (handle.stats.visual_tokens_in, handle.stats.visual_tokens_out)
            alone = [
                model.generate(**tiny_qwen.select(inputs, i, grids), max_new_tokens=3, do_sample=False)[0, -3:]
                for i in range(len(grids))
            ]
    finally:
        visprune.remove(model)
    assert batch.tolist() == [a.tolist() for a in alone]
    assert counts == ([16, 15, 15], [QWEN_TARGET] * 3)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_budget_of_every_unit_is_the_dense_model(family):
    """budget = 16: the 16-token image prunes nothing, the 15-token images keep all theirs (with the
    warning every method gives): the tokens and DeepStack rows are the dense ones."""
    model = sharp_qwen(family)
    pixels, grid = qwen_pixels(model, QWEN_GRIDS)
    with pytest.warns(UserWarning, match="budget=16 exceeds an image's 15 visual tokens"):
        tokens = qwen_tokens(model, pixels, grid, budget=16)
    dense = qwen_tokens(model, pixels, grid, budget=10**6)  # (every image keeps all: the warning again)
    with torch.no_grad():
        stock = model.model.visual(pixels, grid_thw=grid)
    torch.testing.assert_close(torch.cat(tokens.features), stock.pooler_output, rtol=1e-5, atol=1e-5)
    for a, b in zip(tokens.features, dense.features, strict=True):
        assert torch.equal(a, b)
    assert [r[0].sources.tolist() for r in tokens.reductions] == [list(range(n)) for n in (16, 15, 15)]
    if family == "qwen3-vl":
        levels = torch.cat(tokens.extras["deepstack"])
        for i, level in enumerate(stock.deepstack_features):
            torch.testing.assert_close(levels[:, i], level, rtol=1e-5, atol=1e-5)


def test_qwen_errors():
    model = tiny_qwen.tiny_qwen("qwen2.5-vl")
    with pytest.raises(visprune.InputError, match="budget"):
        visprune.apply(model, "flowcut", budget=0)
    with pytest.raises(visprune.UnsupportedModelError, match="apply it without tower_layer"):
        visprune.apply(model, "flowcut", budget=4, tower_layer=2)
    assert getattr(model, "_visprune_handle", None) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_replayed_tower_equals_the_plain_pass(model):
    graphs.clear()
    tower = model.model.vision_tower.cuda()
    try:
        for p in (tiny.varied_pixels(model, 3), tiny.varied_pixels(model, 4)[1:]):
            p = p.cuda()
            with torch.no_grad():
                plain = vision._flowcut_tower(p, tower=tower, feature=5, keep=TARGET)
                for _ in range(2):  # capture, then replay
                    got = vision.encode(tower, p, -2, "default", {"kept": SignalRequest("flowcut", keep=TARGET)})
                    assert torch.equal(got.signals["kept"], plain[1]) and torch.equal(got.features, plain[0])
        assert len(graphs._cache) == 1
    finally:
        tower.cpu()
        graphs.clear()
