"""The `signal` option of the methods that score by CLS attention: one mechanism for every one of them."""

import pytest

from visprune.errors import InputError, UnsupportedModelError
from visprune.methods import SignalRequest, get_method
from visprune.methods.base import available_requests, score_request

CLS_METHODS = ["prumerge", "prumerge+", "knee", "knee+text", "fastervlm", "vtc-cls", "visionzip", "vispruner"]
NO_CLS = {"mean_received", "mean_received_layers", "keys"}
WITH_CLS = NO_CLS | {"cls_attn", "cls_attn_layers", "cls_cosine", "cls_feature"}
KNEE = ("knee", "knee+text")  # their default is the CLS-patch cosine, not CLS attention


def encoder_requests(name: str, **options) -> dict[str, SignalRequest]:
    spec = get_method(name)
    enc = get_method(spec.encoder_stage) if spec.encoder_stage else spec
    return enc.signals(spec.bind(options, llm_layers=8, vision_layers=24))


@pytest.mark.parametrize("name", CLS_METHODS)
def test_every_cls_method_takes_signal_and_documents_it(name):
    spec = get_method(name)
    assert spec.defaults["signal"] is None
    assert "mean-received" in spec.param_docs["signal"] and "{SIGNAL}" not in spec.param_docs["signal"]
    doc = (spec.fn.__doc__ or "") + (get_method(spec.encoder_stage).fn.__doc__ if spec.encoder_stage else "")
    assert "without CLS" in doc
    with pytest.raises(InputError, match="signal"):
        spec.options(signal="attention")


@pytest.mark.parametrize("name", CLS_METHODS)
def test_signal_picks_the_kind_and_the_keyword_stays(name):
    default = {k: r for k, r in encoder_requests(name).items() if r.kind not in ("keys", "cls_feature")}
    cls = {k: r for k, r in encoder_requests(name, signal="cls").items() if r.kind not in ("keys", "cls_feature")}
    received = {
        k: r for k, r in encoder_requests(name, signal="mean-received").items() if r.kind not in ("keys", "cls_feature")
    }
    assert len(default) == 1 and default.keys() == cls.keys() == received.keys()
    (key,) = default
    assert cls[key].kind.startswith("cls_attn") and cls[key].fallback is None
    assert received[key].kind == cls[key].kind.replace("cls_attn", "mean_received")
    assert received[key].fallback is None
    assert (received[key].layers, received[key].heads) == (cls[key].layers, cls[key].heads)
    best = "cls_cosine" if name in KNEE else cls[key].kind
    assert default[key].kind == best and default[key].fallback == received[key].kind
    # The best available: CLS attention (knee: the CLS cosine) where the tower has CLS, else mean-received.
    assert default[key].resolve(WITH_CLS) == SignalRequest(best, cls[key].layers, cls[key].heads)
    assert default[key].resolve(NO_CLS) == received[key]
    assert received[key].resolve(WITH_CLS) == received[key]
    with pytest.raises(UnsupportedModelError, match="cls_attn"):
        cls[key].resolve(NO_CLS)


def test_score_request_layers_and_errors():
    assert score_request(None, (-5, -4), "mean", several=True) == SignalRequest(
        "cls_attn_layers", (-5, -4), "mean", fallback="mean_received_layers"
    )
    assert score_request("mean-received", (-1,), "sum") == SignalRequest("mean_received", (-1,), "sum")
    with pytest.raises(InputError, match="signal"):
        score_request("CLS", (-1,), "mean")
    with pytest.raises(UnsupportedModelError, match="'cls_attn' or 'mean_received'"):
        score_request(None, (-1,), "mean").resolve({"keys"})


def test_optional_requests_are_left_out_where_the_model_lacks_them():
    """An optional request (VisionZip's CLS token) is dropped on a model without its kind; a required one
    is kept (the adapter then refuses it with its own error), and so is one whose fallback exists."""
    optional = SignalRequest("cls_feature", optional=True)
    required = SignalRequest("cls_feature")
    scored = score_request(None, (-1,), "mean")
    requests = {"a": optional, "b": required, "c": scored}
    assert available_requests(requests, WITH_CLS) == requests
    assert available_requests(requests, NO_CLS) == {"b": required, "c": scored}
    with pytest.raises(UnsupportedModelError, match="optional signal"):
        optional.resolve(NO_CLS)
