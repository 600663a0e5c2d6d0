"""Analytic FLOPs / memory against FlopCounterMode and real caches of tiny random-weight models."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
)

from visprune import InputError, configs, flops
from visprune.cli import main

IMAGE_TOKEN = 100


def tiny_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        projection_dim=16,
    )


def tiny_text_config(kv_heads: int = 2) -> LlamaConfig:
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=120,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    return cfg


def tiny_llava_config() -> LlavaConfig:
    cfg = LlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=16,
    )
    cfg._attn_implementation = "eager"
    return cfg


def count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def rope_matmul(rotary: torch.nn.Module, tokens: int) -> int:
    """What FlopCounterMode counts for the rotary-embedding module alone, with the [1, S] positions a
    model builds when none are passed: its frequency product is a matmul in some transformers versions
    (e.g. 5.17) and elementwise in others (5.23, counted 0)."""
    x = torch.zeros(1, tokens, 1)
    positions = torch.arange(tokens).unsqueeze(0)
    return count(lambda: rotary(x, positions))


def assert_counts(estimated: int, measured: int, rope: int) -> None:
    """The analytic count equals FlopCounterMode's, up to the version-dependent RoPE product."""
    assert measured - estimated in (0, rope), (estimated, measured, rope)


def test_vision_tower_matches_flop_counter() -> None:
    cfg = tiny_vision_config()
    cfg._attn_implementation = "eager"
    model = CLIPVisionModel(cfg).eval()
    measured = count(lambda: model(torch.randn(3, 3, 28, 28)))
    v = flops.vision_dims(cfg, feature_layer=-1)
    assert v.layers_used == 3 and v.tokens == 17
    assert sum(flops.vision_flops(v, crops=3).values()) == measured


def test_vision_feature_layer_skips_last_layer() -> None:
    v = flops.vision_dims(tiny_vision_config(), feature_layer=-2)
    assert v.layers_used == 2
    assert flops.vision_dims(tiny_vision_config(), feature_layer=[-2, -3]).layers_used == 2
    skipped, everything = flops.vision_flops(v, 1), flops.vision_flops(v, 1, layers=3)
    assert sum(everything.values()) - sum(skipped.values()) == sum(flops.vision_layer_flops(v).values())


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_llama_prefill_matches_flop_counter(kv_heads: int) -> None:
    cfg = tiny_text_config(kv_heads)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 120, (2, 11))
    measured_all = count(lambda: model(ids, use_cache=False))
    measured_last = count(lambda: model(ids, use_cache=False, logits_to_keep=1))
    est = flops.estimate(cfg, None, text_tokens=11, batch=2, causal=False, lm_head_all_tokens=True)
    assert est.vision == est.projector == 0
    assert_counts(est.llm_prefill + est.lm_head, measured_all, rope_matmul(model.model.rotary_emb, 11))
    last = flops.estimate(cfg, None, text_tokens=11, batch=2, causal=False)
    assert_counts(last.llm_prefill + last.lm_head, measured_last, rope_matmul(model.model.rotary_emb, 11))


def test_gqa_shrinks_kv_projections_only() -> None:
    full, gqa = (flops.estimate(tiny_text_config(k), None, text_tokens=20) for k in (4, 1))
    t = flops.text_dims(tiny_text_config(1))
    assert full.breakdown["llm_proj"] - gqa.breakdown["llm_proj"] == t.layers * 2 * 20 * 64 * 2 * (4 - 1) * t.head_dim
    assert full.breakdown["llm_attn"] == gqa.breakdown["llm_attn"]
    assert full.breakdown["llm_mlp"] == gqa.breakdown["llm_mlp"]
    assert gqa.memory.kv_cache_prefill * 4 == full.memory.kv_cache_prefill


def test_causal_attention_counts_half_plus_diagonal() -> None:
    assert flops.attention_pairs(10) == 55 and flops.attention_pairs(10, causal=False) == 100
    cfg = tiny_text_config()
    causal, full = (flops.estimate(cfg, None, text_tokens=10, causal=c) for c in (True, False))
    assert causal.breakdown["llm_attn"] * 100 == full.breakdown["llm_attn"] * 55
    assert causal.breakdown["llm_mlp"] == full.breakdown["llm_mlp"]


def test_decode_with_kv_cache_matches_flop_counter() -> None:
    cfg = tiny_text_config(kv_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    prompt, batch, new = 9, 2, 4
    ids = torch.randint(0, 120, (batch, prompt))
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    cache, measured = out.past_key_values, 0
    for _ in range(new - 1):
        step = torch.randint(0, 120, (batch, 1))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            cache = model(step, past_key_values=cache, use_cache=True).past_key_values
        measured += counter.get_total_flops()
    est = flops.estimate(cfg, None, text_tokens=prompt, new_tokens=new, batch=batch)
    assert est.decode_steps == new - 1
    assert_counts(est.decode, measured, (new - 1) * rope_matmul(model.model.rotary_emb, 1))
    assert est.memory.kv_cache_final == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / 2


def test_tiny_llava_matches_flop_counter_params_and_kv_cache() -> None:
    cfg = tiny_llava_config()
    model = LlavaForConditionalGeneration(cfg).eval()
    batch, text = 2, 5
    ids = torch.cat([torch.full((batch, 16), IMAGE_TOKEN), torch.randint(0, 99, (batch, text))], 1)
    pixels = torch.randn(batch, 3, 28, 28)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
    est = flops.estimate(
        cfg,
        None,
        text,
        batch=batch,
        dtype="float32",
        causal=False,
        lm_head_all_tokens=True,
        count_unused_vision_layers=True,
    )
    assert est.dense_visual_tokens == 16 and est.tokens_per_layer == [21, 21]
    rope = rope_matmul(model.model.language_model.rotary_emb, 16 + text)
    assert_counts(est.prefill, counter.get_total_flops(), rope)
    assert est.memory.weights["total"] == 4 * sum(p.numel() for p in model.parameters())
    layers = out.past_key_values.layers
    assert est.memory.kv_cache_per_layer == [layer.keys.nbytes + layer.values.nbytes for layer in layers]
    assert est.memory.kv_cache_prefill == sum(est.memory.kv_cache_per_layer)
    used = flops.estimate(cfg, None, text, batch=batch, dtype="float32", causal=False, lm_head_all_tokens=True)
    assert used.vision < est.vision


def test_fewer_visual_tokens_fewer_flops_and_bytes() -> None:
    previous = None
    for k in (576, 400, 192, 64, 1, 0):
        est = flops.estimate("llava-1.5-7b", k, text_tokens=50, new_tokens=8, gpu="h100-sxm")
        if previous is not None:
            assert est.llm_prefill < previous.llm_prefill
            assert est.decode < previous.decode
            assert est.total < previous.total
            assert est.memory.kv_cache_final < previous.memory.kv_cache_final
            assert est.roofline.total_ms <= previous.roofline.total_ms
            assert est.vision == previous.vision
        previous = est


def test_per_layer_tokens_compose_from_uniform_runs() -> None:
    cfg = tiny_text_config()
    mixed = flops.estimate(cfg, llm_tokens_per_layer=[30, 12], new_tokens=3)
    a, b = (flops.estimate(cfg, None, text_tokens=n, new_tokens=3) for n in (30, 12))
    assert mixed.llm_prefill_per_layer == [a.llm_prefill_per_layer[0], b.llm_prefill_per_layer[1]]
    assert mixed.memory.kv_cache_per_layer == [a.memory.kv_cache_per_layer[0], b.memory.kv_cache_per_layer[1]]
    assert b.decode < mixed.decode < a.decode
    seven = flops.estimate("llava-1.5-7b", None, 50, llm_tokens_per_layer=[626] * 2 + [150] * 30)
    assert seven.llm_prefill < flops.estimate("llava-1.5-7b", None, 50).llm_prefill
    assert seven.visual_tokens == 576


def test_bundled_configs_and_dense_counts() -> None:
    assert configs.available() == ["llava-1.5-13b", "llava-1.5-7b", "qwen2.5-vl-7b", "qwen3-vl-8b"]
    seven = flops.model_dims("llava-1.5-7b")
    assert seven.dense_tokens_per_image == 576 and seven.vision.layers_used == 23
    assert (seven.text.hidden, seven.text.layers, seven.text.vocab) == (4096, 32, 32064)
    thirteen = flops.model_dims("llava-1.5-13b")
    assert (thirteen.text.hidden, thirteen.text.layers, thirteen.text.intermediate) == (5120, 40, 13824)
    est = flops.estimate("llava-1.5-7b", 576, 50)
    assert 7.0e9 < est.memory.weights["total"] / 2 < 7.1e9
    assert flops.estimate("llava-1.5-7b", None, 50, images=2).dense_visual_tokens == 1152


def test_llava_next_anyres_counts() -> None:
    cfg = LlavaNextConfig(vision_config=configs.load("llava-1.5-7b").vision_config, text_config=tiny_text_config())
    dims = flops.model_dims(cfg)
    assert dims.crops_per_image == 5
    assert dims.dense_tokens_per_image == 576 + 48 * 48 + 48
    assert flops.model_dims(cfg, image_size=(336, 672)).dense_tokens_per_image < dims.dense_tokens_per_image


def test_config_from_path(tmp_path) -> None:
    tiny_llava_config().save_pretrained(tmp_path)
    by_dir = flops.estimate(str(tmp_path), 8, 5)
    by_file = flops.estimate(str(tmp_path / "config.json"), 8, 5)
    assert by_dir.total == by_file.total == flops.estimate(tiny_llava_config(), 8, 5).total


def test_roofline_presets() -> None:
    est = flops.estimate("llava-1.5-7b", 576, 50, new_tokens=16, gpu="h200")
    phases = est.roofline.phases
    assert phases["prefill"].bound == "compute" and phases["decode"].bound == "memory"
    assert phases["prefill"].time_ms == pytest.approx(phases["prefill"].flops / 989e12 * 1e3)
    h100 = flops.estimate("llava-1.5-7b", 576, 50, new_tokens=16, gpu="h100-sxm")
    assert h100.roofline.phases["decode"].time_ms == pytest.approx(phases["decode"].time_ms * 4800 / 3350)
    custom = flops.estimate("llava-1.5-7b", 576, 50, peak_tflops=100, bandwidth_gbs=1000)
    assert custom.roofline.gpu.name == "custom"
    assert json.loads(json.dumps(est.to_dict()))["roofline"]["total_ms"] == pytest.approx(est.roofline.total_ms)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"visual_tokens": 577}, "exceed the dense count 576"),
        ({"visual_tokens": -1}, "visual tokens must be >= 0"),
        ({"text_tokens": -3}, "text tokens must be >= 0"),
        ({"new_tokens": -1}, "new tokens must be >= 0"),
        ({"batch": 0}, "batch must be >= 1"),
        ({"llm_tokens_per_layer": [100] * 31}, "has 31 entries but the LLM has 32"),
        ({"llm_tokens_per_layer": [700] * 32}, "exceeds the dense visual count"),
        ({"visual_tokens": [64] * 3}, "3 per-layer entries"),
        ({"dtype": "fp16"}, "unknown dtype"),
        ({"gpu": "h100"}, "unknown gpu preset"),
    ],
)
def test_bad_input_errors(kwargs: dict, message: str) -> None:
    args = {"text_tokens": 50, **kwargs}
    with pytest.raises(InputError, match=message):
        flops.estimate("llava-1.5-7b", **args)


def test_unknown_config_name() -> None:
    with pytest.raises(InputError, match=r"Did you mean: 'llava-1\.5-7b'"):
        flops.estimate("llava-1.5-7", 64, 50)


def test_cli_table(capsys) -> None:
    argv = ["flops", "--config", "llava-1.5-7b", "--visual-tokens", "64", "--new-tokens", "8", "--gpu", "h100-sxm"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for word in ("llm_prefill", "dense GFLOPs", "kv cache at the end", "roofline lower bound on h100-sxm", "decode"):
        assert word in out


def test_cli_json_and_tokens_per_layer(capsys) -> None:
    per_layer = ",".join(["626"] * 2 + ["114"] * 30)
    assert main(["flops", "--tokens-per-layer", per_layer, "--text-tokens", "50", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["estimate"]["tokens_per_layer"][2] == 114
    assert data["dense"]["tokens_per_layer"] == [626] * 32
    assert 0 < data["ratio_vs_dense"]["llm_prefill"] < 1
    assert data["estimate"]["flops"]["total"] == sum(
        data["estimate"]["flops"][k] for k in ("vision", "projector", "llm_prefill", "lm_head", "decode")
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--visual-tokens", "1000"], "exceed the dense count 576"),
        (["--tokens-per-layer", "1,2,3"], "has 3 entries but the LLM has 32"),
        (["--tokens-per-layer", "1,x"], "comma-separated integers"),
        (["--batch", "-2"], "batch must be >= 1"),
        (["--config", "/nonexistent/cfg.json"], "neither a bundled name"),
    ],
)
def test_cli_errors(capsys, argv: list[str], message: str) -> None:
    assert main(["flops", *argv]) == 2
    assert message in capsys.readouterr().err
