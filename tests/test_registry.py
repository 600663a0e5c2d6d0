"""The registry: every method is listed with documented options; errors suggest the right names."""

import pytest

import visprune
from visprune.errors import InputError, UnknownMethodError
from visprune.methods import Placement, get_method
from visprune.methods.registry import parse_option_docs

EXPECTED = {
    "prumerge": Placement.ENCODER,
    "prumerge+": Placement.ENCODER,
    "knee": Placement.ENCODER,
    "fastervlm": Placement.ENCODER,
    "vtc-cls": Placement.ENCODER,
    "visionzip": Placement.ENCODER,
    "tome": Placement.ENCODER,
    "random": Placement.ENCODER,
    "pool": Placement.ENCODER,
    "knee+text": Placement.BOTH,
    "fastv": Placement.LLM,
    "sparsevlm": Placement.LLM,
    "dart": Placement.LLM,
    "pdrop": Placement.LLM,
}


def test_all_fourteen_methods_registered_with_placement():
    specs = {s.name: s for s in visprune.list_methods()}
    assert {n: s.placement for n, s in specs.items()} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_option_is_documented_and_signals_resolve(name):
    spec = get_method(name)
    assert spec.description and "\n" not in spec.description
    assert set(spec.param_docs) >= set(spec.defaults)
    assert all(spec.param_docs[k] for k in spec.defaults)
    signals = spec.signals(spec.defaults)
    assert all(req.kind in {"cls_attn", "cls_attn_layers", "keys", "q", "k", "hidden"} for req in signals.values())
    if spec.placement is not Placement.ENCODER:
        layers = spec.layers(spec.defaults)
        assert layers and all(isinstance(i, int) and i >= 0 for i in layers)
        assert list(layers) == sorted(set(layers))


def test_adaptive_flags():
    adaptive = {s.name for s in visprune.list_methods() if s.adaptive}
    assert {"prumerge", "prumerge+", "knee", "knee+text"} <= adaptive
    assert not adaptive & {"fastervlm", "visionzip", "random", "pool", "tome"}


def test_two_stage_method_merges_encoder_options():
    both = get_method("knee+text")
    assert both.encoder_stage == "knee"
    assert set(get_method("knee").defaults) <= set(both.defaults)


def test_unknown_method_suggests_closest():
    with pytest.raises(UnknownMethodError, match="prumerge"):
        get_method("prumerg")
    with pytest.raises(KeyError):
        get_method("nope")


def test_unknown_option_is_refused_with_hint():
    spec = get_method("fastervlm")
    with pytest.raises(InputError, match="budget"):
        spec.options(budgt=3)
    assert spec.options(budget=3)["budget"] == 3
    assert spec.options() == spec.defaults


def test_parse_option_docs():
    doc = """Do a thing.

    Options:
        alpha: the first
            option, continued.
        beta (int): second.

    Returns: nothing.
    """
    assert parse_option_docs(doc) == {"alpha": "the first option, continued.", "beta": "second."}
    assert parse_option_docs("no options") == {}


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("fastervlm", {"budget": 0}, "budget=0 is out of range"),
        ("fastervlm", {"budget": "64"}, "budget must be an int"),
        ("prumerge", {"fence": "bogus"}, "fence='bogus' is not valid; choose one of"),
        ("pdrop", {"keep_ratios": (0.5, 0.25)}, "give one per layer"),
        ("pool", {"output_grid": (4,)}, "output_grid must be a pair"),
        ("knee+text", {"text_detector": "nope"}, "text_detector='nope'"),
    ],
)
def test_apply_refuses_bad_options_before_patching(method, options, match):
    from tests.models.tiny import tiny_llava

    model = tiny_llava()
    generate = model.generate
    with pytest.raises(InputError, match=match):
        visprune.apply(model, method, **options)
    assert model.generate == generate  # nothing was patched
