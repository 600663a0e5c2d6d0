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
    "divprune": Placement.ENCODER,
    "vispruner": Placement.ENCODER,
    "cdpruner": Placement.ENCODER,
    "scope": Placement.ENCODER,
    "flowcut": Placement.ENCODER,
    "knee+text": Placement.BOTH,
    "fastv": Placement.LLM,
    "sparsevlm": Placement.LLM,
    "dart": Placement.LLM,
    "pdrop": Placement.LLM,
}


def test_every_method_is_registered_with_its_placement():
    specs = {s.name: s for s in visprune.list_methods()}
    assert {n: s.placement for n, s in specs.items()} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_option_is_documented_and_signals_resolve(name):
    spec = get_method(name)
    assert spec.description and "\n" not in spec.description
    assert set(spec.param_docs) >= set(spec.defaults)
    assert all(spec.param_docs[k] for k in spec.defaults)
    signals = spec.signals(spec.defaults)
    kinds = {
        "cls_attn",
        "cls_attn_layers",
        "keys",
        "projected",
        "prompt",
        "q",
        "k",
        "hidden",
        "cls_feature",
        "cls_cosine",
        "flowcut",
    }
    assert all(req.kind in kinds for req in signals.values())
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


def test_every_fixed_budget_method_owns_its_budget_rule():
    for spec in visprune.list_methods():
        assert (spec.budget_rule is None) == spec.adaptive, spec.name


def test_a_new_method_needs_only_its_registration_for_budgets():
    """A fixed-budget method registered with a rule is budgeted by the tools with no name checks; one
    registered without a rule (or an adaptive one with a rule) is refused at registration."""
    from visprune.budgets import options_for_budget
    from visprune.eval.synth import plan_cells
    from visprune.methods.budget_rules import TOKENS
    from visprune.methods.registry import _REGISTRY, register

    def first_k(features, *, grid=None, budget: int = 8):
        """Keep the first `budget` tokens.

        Options:
            budget: tokens kept per image.
        """
        return features[:, :budget]

    def check(*, budget):
        return None

    try:
        register(
            "test-first-k",
            description="first K",
            placement=Placement.ENCODER,
            adaptive=False,
            check=check,
            budget_rule=TOKENS,
        )(first_k)
        assert options_for_budget("test-first-k", 64) == {"budget": 64}
        assert plan_cells(["test-first-k"], [32, 64])[-2:] == [("test-first-k", 32), ("test-first-k", 64)]
    finally:
        _REGISTRY.pop("test-first-k", None)
    with pytest.raises(RuntimeError, match="needs a budget_rule"):
        register("test-no-rule", description="x", placement=Placement.ENCODER, adaptive=False, check=check)(first_k)
    with pytest.raises(RuntimeError, match="takes no budget_rule"):
        register(
            "test-adaptive",
            description="x",
            placement=Placement.ENCODER,
            adaptive=True,
            check=check,
            budget_rule=TOKENS,
        )(first_k)
    with pytest.raises(RuntimeError, match="visual_kept is for methods with LLM-side stages"):
        register(
            "test-encoder-count",
            description="x",
            placement=Placement.ENCODER,
            adaptive=False,
            check=check,
            budget_rule=TOKENS,
            visual_kept=lambda present, options, stage: present,
        )(first_k)
    assert "test-no-rule" not in _REGISTRY and "test-adaptive" not in _REGISTRY
    assert "test-encoder-count" not in _REGISTRY


def test_where_published_code_materialises_attention_is_part_of_the_registration():
    where = {s.name: s.published_attention for s in visprune.list_methods() if s.published_attention}
    assert where == {
        "fastervlm": "vision",
        "vtc-cls": "vision",
        "visionzip": "vision",
        "vispruner": "vision",
        "scope": "vision",
        "flowcut": "vision",
        "fastv": "llm",
        "sparsevlm": "llm",
        "pdrop": "llm",
    }
