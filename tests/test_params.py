"""nst_core.params: the paper's defaults, mappings (JSON, YAML), and a named field for every bad value."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from nst_core.errors import NSTError, ParamError
from nst_core.params import StyleParams

PAPER_STYLE = {"relu1_1": 0.2, "relu2_1": 0.2, "relu3_1": 0.2, "relu4_1": 0.2, "relu5_1": 0.2}


# ---- defaults -----------------------------------------------------------------------------------

def test_defaults_are_the_papers():
    p = StyleParams()
    # Gatys et al. 2016: content at (rectified) conv4_2, style at conv1_1 … conv5_1 with w_l = 1/5.
    assert dict(p.content_layers) == {"relu4_2": 1.0}
    assert dict(p.style_layers) == PAPER_STYLE
    assert sum(p.style_layers.values()) == pytest.approx(1.0)
    assert p.ratio == pytest.approx(1e-3)
    assert p.content_weight / p.style_weight == pytest.approx(1e-3)
    assert p.pooling == "avg"
    assert p.optimizer == "lbfgs"
    assert p.init == "noise"
    assert p.preserve_color == "none"
    assert p.tv_weight == 0
    assert p.style_scale == 1.0
    assert p.weights == "imagenet"  # random weights are an explicit choice, never the default
    assert p.used_layers == ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")
    # the paper's normalised network, and one pass at 512 px
    assert p.normalize_network is True
    assert p.level_sizes() == [(512, 500)]


def test_every_field_has_help():
    for name in StyleParams.field_names():
        assert isinstance(StyleParams.help(name), str) and len(StyleParams.help(name)) > 10, name


def test_zero_weight_terms_are_not_used_layers():
    p = StyleParams(style_weight=0, content_layers={"conv1_2": 1})
    assert p.used_layers == ("conv1_2",)
    assert p.ratio == math.inf
    p = StyleParams(content_weight=0, style_layers={"relu1_1": 1, "relu3_1": 0})
    assert p.used_layers == ("relu1_1",)


# ---- mappings -----------------------------------------------------------------------------------

NON_DEFAULT = StyleParams(
    size=300, iterations=77, content_weight=2.5, style_weight=40.0, tv_weight=0.01,
    content_layers={"conv1_2": 0.25, "relu4_2": 0.75}, style_layers={"relu1_1": 0.5, "relu2_1": 0.5},
    style_blend=(0.3, 0.7), style_scale=0.5, pooling="max", normalize_network=False, optimizer="adam",
    learning_rate=0.05, init="content", seed=12345, preserve_color="histogram", levels=2,
    weights="random", device="cpu", precision="bfloat16", max_memory=3 << 30, tile=256,
)


@pytest.mark.parametrize("given, field, value", [
    ({"size": "original"}, "size", 0), ({"size": "Original"}, "size", 0), ({"size": 0}, "size", 0),
    ({"max_memory": "150M"}, "max_memory", 150 << 20), ({"max_memory": "2G"}, "max_memory", 2 << 30),
    ({"max_memory": "1.5GiB"}, "max_memory", 3 << 29), ({"max_memory": 5_000_000}, "max_memory", 5_000_000),
    ({"tile": "auto"}, "tile", "auto"), ({"tile": "off"}, "tile", "off"), ({"tile": "64"}, "tile", 64),
    ({"tile": 16}, "tile", 16),
])
def test_full_resolution_fields(given, field, value):
    assert getattr(StyleParams.from_mapping(given), field) == value


@pytest.mark.parametrize("given, words", [
    ({"size": "huge"}, "whole number"), ({"size": 8}, "original (0) or between 16 and 16384"),
    ({"max_memory": "lots"}, "byte count such as 150M"), ({"max_memory": "-2G"}, "byte count"),
    ({"max_memory": 1000}, "between"), ({"tile": 15}, "between 16"), ({"tile": "big"}, "auto, off or a tile side"),
])
def test_full_resolution_fields_refuse_bad_values(given, words):
    with pytest.raises(ParamError) as e:
        StyleParams.from_mapping(given)
    assert e.value.field == next(iter(given)) and words in str(e.value)


@pytest.mark.parametrize("params", [StyleParams(), NON_DEFAULT], ids=["defaults", "every-field-changed"])
def test_mapping_round_trip(params):
    m = params.to_mapping()
    assert set(m) == set(StyleParams.field_names())
    assert StyleParams.from_mapping(m) == params
    assert hash(StyleParams.from_mapping(m)) == hash(params)


@pytest.mark.parametrize("params", [StyleParams(), NON_DEFAULT], ids=["defaults", "every-field-changed"])
def test_round_trip_through_json_and_yaml(params):
    m = params.to_mapping()
    via_json = json.loads(json.dumps(m))
    via_yaml = yaml.safe_load(yaml.safe_dump(m))
    assert StyleParams.from_mapping(via_json) == params
    assert StyleParams.from_mapping(via_yaml) == params


def test_every_field_differs_in_the_non_default_example():
    # Guards the round-trip test: it only proves something for fields that are not at their default.
    d = StyleParams()
    same = [n for n in StyleParams.field_names() if getattr(NON_DEFAULT, n) == getattr(d, n)]
    assert same == []


def test_dashes_and_underscores():
    a = StyleParams.from_mapping({"style-weight": 5, "content_weight": 2, "tv-weight": 0.5, "preserve-color": "luminance"})
    assert (a.style_weight, a.content_weight, a.tv_weight, a.preserve_color) == (5.0, 2.0, 0.5, "luminance")
    b = StyleParams.from_mapping({"style_weight": 5, "content-weight": 2, "tv_weight": 0.5, "preserve_color": "luminance"})
    assert a == b


def test_ratio_shorthand():
    p = StyleParams.from_mapping({"ratio": 1e-4})
    assert p.style_weight == pytest.approx(1e4)  # content weight 1 → beta = 1 / 1e-4
    assert p.ratio == pytest.approx(1e-4)
    p = StyleParams.from_mapping({"content_weight": 2, "ratio": 1e-3})
    assert p.style_weight == pytest.approx(2000)
    # the base's content weight is used when the mapping gives none
    p = StyleParams.from_mapping({"ratio": "0.01"}, base=StyleParams(content_weight=3))
    assert p.style_weight == pytest.approx(300)
    # pure style synthesis: content weight 0, the ratio still sets beta
    p = StyleParams.from_mapping({"content_weight": 0, "ratio": 0.5})
    assert p.style_weight == pytest.approx(2.0)


def test_from_mapping_keeps_base_and_defaults():
    base = StyleParams(size=100, seed=7)
    p = StyleParams.from_mapping({"iterations": 3}, base=base)
    assert (p.size, p.seed, p.iterations) == (100, 7, 3)
    assert StyleParams.from_mapping(None) == StyleParams()
    assert StyleParams.from_mapping({}) == StyleParams()


def test_layer_maps_as_lists_and_strings():
    p = StyleParams.from_mapping({"style_layers": ["relu1_1", "relu2_1"]})
    assert dict(p.style_layers) == {"relu1_1": 0.5, "relu2_1": 0.5}
    p = StyleParams.from_mapping({"style_layers": "relu1_1:0.3, relu2_1:0.7", "content_layers": "conv1_2"})
    assert dict(p.style_layers) == {"relu1_1": 0.3, "relu2_1": 0.7}
    assert dict(p.content_layers) == {"conv1_2": 1.0}


def test_integral_floats_from_yaml_become_ints():
    p = StyleParams.from_mapping({"size": 256.0, "iterations": 10.0})
    assert p.size == 256 and isinstance(p.size, int)


# ---- bad values name their field ----------------------------------------------------------------

BAD_MAPPINGS = [
    # unknown key
    ({"sise": 100}, "sise"),
    ({"style-wieght": 1}, "style-wieght"),
    # wrong type
    ({"size": "abc"}, "size"),
    ({"size": 12.5}, "size"),
    ({"size": True}, "size"),
    ({"iterations": [1]}, "iterations"),
    ({"content_weight": "lots"}, "content_weight"),
    ({"style_weight": None}, "style_weight"),
    ({"normalize_network": "yes"}, "normalize_network"),
    ({"pooling": 3}, "pooling"),
    ({"style_blend": {"a": 1}}, "style_blend"),
    ({"style_blend": ["x"]}, "style_blend"),
    ({"style_layers": 5}, "style_layers"),
    ({"style_layers": []}, "style_layers"),
    ({"ratio": "much"}, "ratio"),
    # out of range
    ({"size": 8}, "size"),
    ({"size": 100000}, "size"),
    ({"iterations": -1}, "iterations"),
    ({"content_weight": -1}, "content_weight"),
    ({"style_weight": float("nan")}, "style_weight"),
    ({"tv_weight": float("inf")}, "tv_weight"),
    ({"style_scale": 0}, "style_scale"),
    ({"style_scale": 9}, "style_scale"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"seed": -1}, "seed"),
    ({"levels": 9}, "levels"),
    ({"style_blend": [-1, 2]}, "style_blend"),
    ({"style_blend": [0, 0]}, "style_blend"),
    ({"style_blend": []}, "style_blend"),
    ({"ratio": 0}, "ratio"),
    ({"style_layers": {"relu1_1": -0.5}}, "style_layers.relu1_1"),
    ({"content_layers": {"relu4_2": float("inf")}}, "content_layers.relu4_2"),
    # unknown layer
    ({"style_layers": {"relu9_9": 1}}, "style_layers"),
    ({"content_layers": ["pool1"]}, "content_layers"),  # pooling outputs are not feature layers
    ({"content_layers": "conv6_1"}, "content_layers"),
    # both weights 0
    ({"content_weight": 0, "style_weight": 0}, "content_weight"),
    # bad choice
    ({"pooling": "median"}, "pooling"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"preserve_color": "foo"}, "preserve_color"),
    ({"precision": "fp8"}, "precision"),
    ({"device": "tpu"}, "device"),
    ({"device": "cuda:x"}, "device"),
    ({"init": ""}, "init"),
    ({"weights": ""}, "weights"),
    # contradictions
    ({"ratio": 1e-3, "style_weight": 5}, "ratio"),
]


@pytest.mark.parametrize("data,field", BAD_MAPPINGS, ids=[f"{f}={list(d.values())[-1]!r}" for d, f in BAD_MAPPINGS])
def test_bad_value_names_its_field(data, field):
    with pytest.raises(ParamError) as info:
        StyleParams.from_mapping(data)
    e = info.value
    assert e.field == field
    assert e.message.startswith(f"{field}: ")
    assert len(e.message) > len(field) + 10  # says what is wrong, not just where
    assert e.to_mapping() == {"kind": "param", "message": e.message, "field": field}
    assert isinstance(e, NSTError) and isinstance(e, ValueError) and e.exit_code == 2


@pytest.mark.parametrize("kwargs,field", [
    ({"size": "512"}, "size"),
    ({"iterations": 1.5}, "iterations"),
    ({"pooling": "median"}, "pooling"),
    ({"style_layers": {"conv9_1": 1}}, "style_layers"),
    ({"content_weight": 0, "style_weight": 0}, "content_weight"),
    ({"normalize_network": 1}, "normalize_network"),
    ({"style_blend": ()}, "style_blend"),
])
def test_constructor_validates_too(kwargs, field):
    with pytest.raises(ParamError) as info:
        StyleParams(**kwargs)
    assert info.value.field == field


def test_replace_validates():
    with pytest.raises(ParamError) as info:
        StyleParams().replace(optimizer="newton")
    assert info.value.field == "optimizer"


def test_unknown_key_message_lists_known_names():
    with pytest.raises(ParamError) as info:
        StyleParams.from_mapping({"colour": "luminance"})
    assert "preserve_color" in info.value.message and "ratio" in info.value.message


def test_not_a_mapping():
    with pytest.raises(ParamError) as info:
        StyleParams.from_mapping(["size", 100])
    assert info.value.field == "parameters"


def test_cuda_index_is_a_device():
    assert StyleParams(device="cuda:1").device == "cuda:1"


# ---- coarse-to-fine levels ----------------------------------------------------------------------

@pytest.mark.parametrize("levels", [0, 1, 2, 3, 5])
def test_level_sizes_sum_to_iterations(levels):
    for size in (16, 64, 128, 200, 256, 300, 400, 511, 512, 700, 1024, 2048, 4096):
        for iterations in (0, 1, 2, 7, 100, 500, 1001):
            p = StyleParams(size=size, iterations=iterations, levels=levels)
            lv = p.level_sizes()
            assert sum(n for _, n in lv) == iterations, (size, iterations, lv)
            assert all(n >= 0 for _, n in lv)
            assert lv[-1][0] == size  # the finest level is the output size
            sides = [s for s, _ in lv]
            assert sides == sorted(sides)  # coarsest first
            assert all(16 <= s <= size for s in sides)
            if levels:
                assert len(lv) == levels


@pytest.mark.parametrize("size", [16, 48, 96, 200, 256, 300, 511, 512])
def test_one_level_up_to_the_papers_size(size):
    assert StyleParams(size=size, iterations=100).level_sizes() == [(size, 100)]


@pytest.mark.parametrize("size,sides", [
    (513, [256, 513]), (700, [350, 700]), (1024, [512, 1024]), (1025, [256, 512, 1025]),
    (2048, [512, 1024, 2048]), (4096, [512, 1024, 2048, 4096]),
])
def test_coarse_to_fine_above_the_papers_size_starts_at_most_there(size, sides):
    # Each level doubles the previous one's side (up to rounding); the first is the largest such
    # side that is at most 512 px, where the paper's single pass works.
    assert [s for s, _ in StyleParams(size=size, iterations=500).level_sizes()] == sides


def test_explicit_single_level_at_1024():
    assert StyleParams(size=1024, iterations=50, levels=1).level_sizes() == [(1024, 50)]


def test_every_field_takes_its_own_type_and_refuses_another_by_its_type_hint():
    """The coercion follows each field's type hint (typing.get_type_hints), so a field added later
    (with any spelling of its annotation) is checked as its type says without a new branch."""
    import typing

    from nst_core import params as P

    hints = typing.get_type_hints(StyleParams)
    wrong = {int: "many", float: "a lot", bool: "yes", str: 5}
    for name in StyleParams.field_names():
        default = StyleParams.default(name)
        plain = StyleParams().to_mapping()[name]
        assert StyleParams.from_mapping({name: plain}) == StyleParams(), name
        kind = P.value_type(name)
        assert P.accepts_none(name) == (type(None) in typing.get_args(hints[name])), name
        if kind in wrong:
            with pytest.raises(ParamError) as e:
                StyleParams.from_mapping({name: wrong[kind]})
            assert e.value.field == name
        if P.accepts_none(name):
            assert getattr(StyleParams.from_mapping({name: None}), name) is None
        else:
            with pytest.raises(ParamError):
                StyleParams.from_mapping({name: None})
        assert default == getattr(StyleParams(), name)
