"""Layer defaults at relative depth (MethodSpec.bind): published values for the reference depth,
moved for other depths; explicit values used as given and refused when they do not fit."""

import pytest

from visprune.errors import InputError
from visprune.methods import get_method
from visprune.methods.depth import RelativeDepth, scale_layers


@pytest.mark.parametrize(
    ("method", "option", "depths"),
    [
        ("pdrop", "layers", {32: (8, 16, 24), 8: (2, 4, 6), 4: (1, 2, 3), 40: (10, 20, 30), None: (8, 16, 24)}),
        ("sparsevlm", "layers", {32: (2, 6, 15), 8: (1, 2, 4), 28: (2, 5, 13), None: (2, 6, 15)}),
        ("fastv", "layer", {32: 2, 8: 2, 3: 2, 2: 1, 80: 2, None: 2}),
        ("dart", "layer", {32: 2, 4: 2, 2: 1}),
        ("knee+text", "text_layer", {32: 2, 2: 1}),
    ],
)
def test_llm_layer_defaults_follow_the_depth(method, option, depths):
    spec = get_method(method)
    for depth, expect in depths.items():
        assert spec.bind({}, llm_layers=depth, vision_layers=None)[option] == expect, depth


def test_vtc_cls_start_layer_follows_the_tower():
    spec = get_method("vtc-cls")
    got = {d: spec.bind({}, llm_layers=None, vision_layers=d)["start_layer"] for d in (24, 48, 3, 2, None)}
    assert got == {24: -5, 48: -10, 3: -2, 2: -2, None: -5}
    assert spec.signals(spec.bind({}, llm_layers=None, vision_layers=48))["cls_attn_layers"].layers == tuple(
        range(-10, -1)
    )


def test_explicit_values_are_used_as_given_or_refused():
    pdrop = get_method("pdrop")
    assert pdrop.bind({"layers": (1, 2, 3)}, llm_layers=8, vision_layers=None)["layers"] == (1, 2, 3)
    assert pdrop.bind({"layers": (8, 16, 24)}, llm_layers=40, vision_layers=None)["layers"] == (8, 16, 24)
    with pytest.raises(InputError, match=r"method 'pdrop': layers=\(8, 16, 24\) does not fit .* 8-layer .* 1\.\.7"):
        pdrop.bind({"layers": (8, 16, 24)}, llm_layers=8, vision_layers=None)
    with pytest.raises(InputError, match=r"layer=4 does not fit .* 4-layer"):
        get_method("fastv").bind({"layer": 4}, llm_layers=4, vision_layers=None)
    with pytest.raises(InputError, match=r"layers=\(2, 6, 7\) does not fit .* 0\.\.6"):
        get_method("sparsevlm").bind({"layers": (2, 6, 7)}, llm_layers=8, vision_layers=None)
    with pytest.raises(InputError, match=r"start_layer=-30 does not fit .* 24-layer vision tower .* -24\.\.-2"):
        get_method("vtc-cls").bind({"start_layer": -30}, llm_layers=None, vision_layers=24)
    assert get_method("vtc-cls").bind({"start_layer": -13}, llm_layers=None, vision_layers=24)["start_layer"] == -13


def test_defaults_that_cannot_fit_and_bad_depths_are_refused():
    with pytest.raises(InputError, match="cannot place"):
        get_method("pdrop").bind({}, llm_layers=3, vision_layers=None)  # three stages in layers 1..2
    with pytest.raises(InputError, match="llm_layers"):
        get_method("fastv").bind({}, llm_layers=0, vision_layers=None)
    with pytest.raises(InputError, match="does not take"):
        get_method("fastv").bind({"layers": 3}, llm_layers=8, vision_layers=None)


def test_scale_layers_and_printing():
    assert scale_layers((8, 16, 24), 32, 8) == (2, 4, 6)
    assert scale_layers((2, 6, 16), 32, 4) == (1, 2, 3)
    assert scale_layers((-5,), 24, 48, (0, 46)) == (-10,)
    with pytest.raises(InputError, match="cannot place"):
        scale_layers((8, 16, 24), 32, 2)
    text = str(get_method("pdrop").defaults["layers"])
    assert "(8, 16, 24)" in text and "32 layers" in text
    assert "does not fit" in str(get_method("fastv").defaults["layer"])
    with pytest.raises(ValueError):
        RelativeDepth(2, reference=32, stack="tower", lowest=1, highest=-1)


def test_stages_pack_below_the_top_of_a_shallow_llm():
    # sparsevlm scores at most at layer L - 2 (it prunes from the next layer on): three stages in a
    # 4-layer LLM need layers 0, 1, 2
    assert get_method("sparsevlm").bind({}, llm_layers=4, vision_layers=None)["layers"] == (0, 1, 2)
    assert scale_layers((30, 31), 32, 4) == (2, 3)
    assert scale_layers((2, 6, 15), 32, 4, (0, 2)) == (0, 1, 2)
