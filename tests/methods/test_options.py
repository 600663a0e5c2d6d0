"""Option validation: every method refuses a bad value of each option when its options are resolved
(what `apply` does) and when the function is called on tensors, with one rule set for both."""

import pytest
import torch

from tests.methods.llm_fixtures import make_layout, qk
from visprune.errors import InputError
from visprune.methods import Placement, get_method, list_methods

# method -> option -> bad values (wrong type, out of range, unknown choice, wrong tuple length ...)
BAD: dict[str, dict[str, list]] = {
    "fastervlm": {"budget": [0, -3, "64", 2.5, True, None], "signal": ["CLS", "mean_received", 1]},
    "vtc-cls": {"budget": [0, "8"], "start_layer": [-1, 3, 0, "-5", -4.0, True], "signal": ["attn"]},
    "visionzip": {
        "dominant": [0, "54", 1.5],
        "contextual": [-1, "10"],
        "budget": [0, "64", 3.0],
        "signal": ["received", True],
        "cls_token": ["yes", 1],
    },
    "tome": {"budget": [0, "64", None]},
    "divprune": {"budget": [0, "64", None, 2.5]},
    "flowcut": {"budget": [0, "64", None, 2.5]},
    "cdpruner": {"budget": [0, "64", None, 2.5]},
    "scope": {"budget": [0, "64", None, 2.5], "alpha": [-1, "1", None, True, float("nan")], "signal": ["bogus"]},
    "vispruner": {"budget": [0, "64"], "important_ratio": [-0.1, 1.5, "0.5", True], "signal": ["attention"]},
    "random": {"budget": [0, None], "seed": ["0", 1.5, None]},
    "pool": {"budget": [0, "64"], "output_grid": [(4,), (4, 0), (4, 4, 4), "4x4", (2.0, 2)]},
    "knee": {
        "detector": ["bogus", None, 1],
        "smooth": [0, 1.5, "3"],
        "k_min": [0, "16"],
        "k_max": [0, "32", 4],  # 4 < k_min = 16
        "attention": ["multi", None],
        "signal": ["mean", ""],
    },
    "prumerge": {
        "fence": ["bogus", None],
        "weights": ["normalised", 1],
        "order": ["random"],
        "neighbors": [-1, 2.0, True, "32"],
        "extra_token": [1, "yes", None],
        "attention": ["sum", "Single"],
        "signal": ["cls_attn", 0],
    },
    "fastv": {"layer": [0, -1, "2", 2.0, True], "keep_ratio": [0, 1.5, -0.5, "0.5", None]},
    "dart": {"layer": [0, "2"], "budget": [0, "64"], "pivots": [0, 4.0]},
    "pdrop": {
        "layers": [(16, 8, 24), (8, 8, 16), (0, 8, 16), [8, 16, 24], (), "8,16,24", (8, 16.0, 24)],
        "keep_ratios": [(0.5, 0.25), (0.25, 0.5, 0.1), (0.5, 0.25, 0), (0.5, 0.25, 1.5), [0.5, 0.25, 0.125], 0.5],
    },
    "sparsevlm": {
        "layers": [(6, 2, 15), (-1, 2, 6), [2, 6, 15], ()],
        "keep_counts": [(300, 200), (300, 0, 110), (300, 200, 110.0), [300, 200, 110], 300],
    },
    "knee+text": {
        "text_layer": [0, "2", 2.5],
        "text_keep_ratio": [0, 2.0, "0.5"],
        "text_detector": ["bogus"],
        "text_smooth": [0, "1"],
        "prune_text": ["yes", 1, None],
        "detector": ["bogus"],
        "k_min": [0],
    },
}
BAD["prumerge+"] = BAD["prumerge"]
CASES = [(m, o, v) for m, opts in BAD.items() for o, values in opts.items() for v in values]


def test_every_option_of_every_method_has_bad_values():
    for spec in list_methods():
        own = set(spec.defaults)
        if spec.encoder_stage is not None:  # the encoder stage's options are covered under its own name
            own -= set(get_method(spec.encoder_stage).defaults)
        assert own <= set(BAD[spec.name]), spec.name


@pytest.mark.parametrize(("method", "option", "value"), CASES)
def test_resolving_options_refuses_bad_values(method, option, value):
    spec = get_method(method)
    with pytest.raises(InputError) as err:
        spec.options(**{option: value})
    message = str(err.value)
    assert message.startswith(f"method {method!r}: ") and option in message and "\n" not in message
    with pytest.raises(InputError):
        spec.bind({option: value}, llm_layers=32, vision_layers=24)


def direct_call(method: str, options: dict):
    """Call the method function on valid tensors of 16 tokens (encoder) or a small layout (LLM)."""
    spec = get_method(method)
    if spec.placement is Placement.ENCODER:
        g = torch.Generator().manual_seed(0)
        feats = torch.randn(2, 16, 8, generator=g)
        signals = {
            "cls_attn": torch.rand(2, 16, generator=g).softmax(-1),
            "keys": torch.randn(2, 16, 8, generator=g),
            "cls_attn_layers": torch.rand(2, 4, 16, generator=g),
            "projected": torch.randn(2, 16, 8, generator=g),
            "prompt": torch.randn(2, 8, generator=g),
            "kept": torch.arange(16).expand(2, 16),  # flowcut: the rows the tower kept (all 16)
        }
        wanted = spec.signals(spec.defaults)
        return spec.fn(feats, **{k: v for k, v in signals.items() if k in wanted}, **options)
    lay = make_layout([(1, 20, 2)])
    q, k = qk(lay)
    hidden = torch.randn(1, lay.attention_mask.shape[1], 8)
    return spec.fn(q=q, k=k, hidden=hidden, layout=lay, **options)


@pytest.mark.parametrize(("method", "option", "value"), CASES)
def test_direct_calls_apply_the_same_rules(method, option, value):
    spec = get_method(method)
    if spec.encoder_stage is not None and option in get_method(spec.encoder_stage).defaults:
        pytest.skip("the encoder stage's options are checked when that stage runs")
    with pytest.raises(InputError) as resolved:
        spec.options(**{option: value})
    with pytest.raises(InputError) as direct:
        direct_call(method, {option: value})
    # one rule set: the message at apply is the direct call's, prefixed with the method's name
    assert str(resolved.value) == f"method {method!r}: {direct.value}"


@pytest.mark.parametrize("spec", list_methods(), ids=lambda s: s.name)
def test_defaults_pass_the_checks(spec):
    assert spec.options() == spec.defaults
    assert spec.bind({}, llm_layers=32, vision_layers=24).keys() == spec.defaults.keys()
