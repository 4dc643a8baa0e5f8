"""Method configs: string coercion, validation that names the field, and JSON round trips."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import pytest

import modfit
from modfit.config import ConfigError, ModuleConfig, coerce
from modfit.heads import HeadConfig
from modfit.registry import method_entry, method_summaries


def test_registry_lists_methods() -> None:
    names = modfit.methods()
    assert names == sorted(names)
    for expected in ("lora", "houlsby", "pfeiffer", "parallel", "scaled_parallel"):
        assert expected in names
    summaries = method_summaries()
    assert list(summaries) == names
    assert all(isinstance(s, str) and s for s in summaries.values())
    for name in names:
        entry = method_entry(name)
        assert entry.config_class.method == name
        if entry.standalone:  # fusion layers have no default: they name the modules they fuse
            assert isinstance(modfit.config(name), entry.config_class)


def test_unknown_method() -> None:
    with pytest.raises(ConfigError, match="unknown method 'lorra'; available: ") as info:
        modfit.config("lorra")
    assert ", ".join(modfit.methods()) in str(info.value)  # every registered method, sorted


def test_register_same_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="method 'lora' is already registered by LoraConfig"):

        @modfit.register_method("lora", object, "another lora")
        @dataclasses.dataclass(frozen=True)
        class OtherLora(ModuleConfig):
            r: int = 1

    assert method_entry("lora").config_class.__name__ == "LoraConfig"


# -- coercion -----------------------------------------------------------------------------------------


def test_lora_strings() -> None:
    config = modfit.config(
        "lora", r="16", alpha="32", dropout="0.05", targets="query, value ,key", layers="0,2", rslora="yes"
    )
    assert config == modfit.config(
        "lora", r=16, alpha=32.0, dropout=0.05, targets=("query", "value", "key"), layers=(0, 2), rslora=True
    )
    assert isinstance(config.alpha, float)  # type: ignore[attr-defined]
    assert modfit.config("lora", layers="none").layers is None  # type: ignore[attr-defined]
    assert modfit.config("lora", layers="null").layers is None  # type: ignore[attr-defined]
    assert modfit.config("lora", layers=[1, "3"]).layers == (1, 3)  # type: ignore[attr-defined]
    assert modfit.config("lora", r="8.0").r == 8  # type: ignore[attr-defined]
    assert modfit.config("lora", init="gaussian").init == "gaussian"  # type: ignore[attr-defined]
    for text, value in (
        ("true", True),
        ("1", True),
        ("on", True),
        ("False", False),
        ("0", False),
        ("no", False),
    ):
        assert modfit.config("lora", rslora=text).rslora is value  # type: ignore[attr-defined]


def test_bottleneck_strings() -> None:
    config = modfit.config(
        "houlsby",
        reduction_factor="8",
        bottleneck_size="none",
        placement="ffn_output",
        mode="parallel",
        scaling="2.5",
        ln_after="true",
        init="bert",
        layers="1",
    )
    assert config.reduction_factor == 8.0  # type: ignore[attr-defined]
    assert config.bottleneck_size is None  # type: ignore[attr-defined]
    assert config.placement == ("ffn_output",)  # type: ignore[attr-defined]
    assert config.mode == "parallel"  # type: ignore[attr-defined]
    assert config.scaling == 2.5  # type: ignore[attr-defined]
    assert config.ln_after is True  # type: ignore[attr-defined]
    assert config.layers == (1,)  # type: ignore[attr-defined]
    assert modfit.config("pfeiffer", bottleneck_size="64").bottleneck_size == 64  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("lora", {"r": "eight"}, r"config\(\): lora.r: expected an integer, got 'eight'"),
        ("lora", {"r": "8.5"}, r"lora.r: expected an integer, got '8.5'"),
        ("lora", {"r": True}, r"lora.r: expected an integer, got True"),
        ("lora", {"r": 0}, r"lora.r: must be >= 1, got 0"),
        ("lora", {"r": "-1"}, r"lora.r: must be >= 1"),
        ("lora", {"alpha": "a lot"}, r"lora.alpha: expected a number"),
        ("lora", {"alpha": 0}, r"lora.alpha: must be > 0"),
        ("lora", {"dropout": 1.0}, r"lora.dropout: must be in \[0, 1\)"),
        ("lora", {"targets": ""}, r"lora.targets: name at least one projection"),
        ("lora", {"targets": 5}, r"lora.targets: expected a list, got 5"),
        ("lora", {"targets": [1]}, r"lora.targets: expected a string, got 1"),
        ("lora", {"layers": "first"}, r"lora.layers: cannot interpret 'first' as tuple\[int, ...\] \| None"),
        ("lora", {"rslora": "maybe"}, r"lora.rslora: expected true/false, got 'maybe'"),
        ("lora", {"init": "xavier"}, r"lora.init: 'xavier' is not one of 'kaiming', 'gaussian'"),
        ("lora", {"rank": 8}, r"unknown parameter\(s\) rank for method 'lora'; known: alpha, dropout, init"),
        ("lora", {"rank": 8, "alfa": 1}, r"unknown parameter\(s\) alfa, rank"),
        ("pfeiffer", {"reduction_factor": 0}, r"pfeiffer.reduction_factor: must be > 0"),
        ("pfeiffer", {"bottleneck_size": 0}, r"pfeiffer.bottleneck_size: must be >= 1"),
        (
            "pfeiffer",
            {"placement": "ffn"},
            r"pfeiffer.placement: 'ffn' is not one of 'attn_output', 'ffn_output'",
        ),
        ("pfeiffer", {"placement": ""}, r"pfeiffer.placement: name at least one"),
        ("houlsby", {"placement": "ffn_output,ffn_output"}, r"houlsby.placement: names a sub-layer twice"),
        ("pfeiffer", {"mode": "serial"}, r"pfeiffer.mode: 'serial' is not one of 'sequential', 'parallel'"),
        ("pfeiffer", {"activation": "nope"}, r"pfeiffer.activation: unknown activation 'nope'"),
        ("pfeiffer", {"dropout": -0.1}, r"pfeiffer.dropout: must be in \[0, 1\)"),
        ("parallel", {"init": "zeros"}, r"parallel.init: 'zeros' is not one of 'zero_up', 'bert', 'houlsby'"),
        ("scaled_parallel", {"scaling": "x4"}, r"scaled_parallel.scaling: expected a number"),
    ],
)
def test_invalid_values_name_the_field(method: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        modfit.config(method, **params)


def test_from_dict_names_its_source() -> None:
    cls = method_entry("lora").config_class
    with pytest.raises(ConfigError, match=r"^card.json: lora.r: expected an integer"):
        cls.from_dict({"r": "x"}, source="card.json")
    with pytest.raises(ConfigError, match=r"^--param: unknown parameter\(s\) q"):
        cls.from_dict({"q": 1}, source="--param")


def test_direct_construction_and_replace_validate() -> None:
    """`from_dict` coerces and checks Literals; construction and `replace` must not skip the checks."""
    lora = modfit.config("lora")
    pfeiffer = modfit.config("pfeiffer")
    for make, message in (
        (lambda: lora.replace(r=0), "lora.r: must be >= 1"),
        (lambda: lora.replace(init="xavier"), "lora.init: unknown 'xavier'"),
        (lambda: type(lora)(init="xavier"), "lora.init"),
        (lambda: pfeiffer.replace(init="zero"), "pfeiffer.init: unknown value 'zero'"),
        (lambda: pfeiffer.replace(mode="serial"), "pfeiffer.mode: unknown value 'serial'"),
        (lambda: pfeiffer.replace(placement=("ffn",)), "pfeiffer.placement: unknown value 'ffn'"),
        (lambda: type(pfeiffer)(reduction_factor=-1), "pfeiffer.reduction_factor"),
    ):
        with pytest.raises(ConfigError, match=message):
            make()
    assert lora.replace(r=4).r == 4  # type: ignore[attr-defined]
    assert lora.r == 8  # type: ignore[attr-defined]


def test_configs_are_frozen() -> None:
    config = modfit.config("lora")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 4  # type: ignore[attr-defined,misc]


def test_preset_defaults() -> None:
    houlsby, pfeiffer = modfit.config("houlsby"), modfit.config("pfeiffer")
    parallel, scaled = modfit.config("parallel"), modfit.config("scaled_parallel")
    assert houlsby.placement == ("attn_output", "ffn_output")  # type: ignore[attr-defined]
    assert houlsby.activation == "swish"  # type: ignore[attr-defined]
    assert pfeiffer.placement == ("ffn_output",) and pfeiffer.original_ln_before  # type: ignore[attr-defined]
    assert parallel.mode == "parallel" and parallel.scaling == 1.0  # type: ignore[attr-defined]
    assert scaled.mode == "parallel" and scaled.scaling == 4.0  # type: ignore[attr-defined]
    assert pfeiffer.inner_size(768) == 48  # type: ignore[attr-defined]
    assert pfeiffer.replace(bottleneck_size=7).inner_size(768) == 7  # type: ignore[attr-defined]
    assert pfeiffer.replace(reduction_factor=1000).inner_size(32) == 1  # type: ignore[attr-defined]


# -- the coercion function itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        ("3", int, 3),
        (3.0, int, 3),
        ("1e3", int, 1000),
        ("0.5", float, 0.5),
        (2, float, 2.0),
        ("text", str, "text"),
        ("None", int | None, None),
        (None, int | None, None),
        ("4", int | None, 4),
        ("2", Literal[1, 2], 2),
        ("b", Literal["a", "b"], "b"),
        ("a,b", tuple[str, ...], ("a", "b")),
        ("a,,b,", tuple[str, ...], ("a", "b")),
        (["1", 2], tuple[int, ...], (1, 2)),
        ((), tuple[int, ...], ()),
        ("x,y", tuple[Literal["x", "y"], ...], ("x", "y")),
        ({"k": 1}, dict, {"k": 1}),
        ({"k": 1}, dict[str, int], {"k": 1}),
    ],
)
def test_coerce(value: Any, annotation: Any, expected: Any) -> None:
    result = coerce(value, annotation, "f")
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "annotation", "message"),
    [
        ("x", int, "f: expected an integer"),
        ("x", float, "f: expected a number"),
        (True, float, "f: expected a number"),
        (3, str, "f: expected a string"),
        ("3", Literal[1, 2], "f: '3' is not one of 1, 2"),
        ("none", int, "f: expected an integer"),
        ("z", tuple[Literal["x", "y"], ...], "f: 'z' is not one of"),
        (5, tuple[int, ...], "f: expected a list"),
        ("k=1", dict, "f: expected a mapping"),
    ],
)
def test_coerce_errors(value: Any, annotation: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        coerce(value, annotation, "f")


# -- JSON round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in modfit.methods() if method_entry(m).standalone])
def test_json_round_trip_of_defaults(method: str) -> None:
    config = modfit.config(method)
    text = json.dumps(config.to_dict())
    again = method_entry(method).config_class.from_dict(json.loads(text))
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert set(config.to_dict()) == {f.name for f in dataclasses.fields(config)}


@pytest.mark.parametrize(
    ("method", "params"),
    [
        (
            "lora",
            {"r": 4, "targets": "re:.*attn.*,ffn_in", "layers": (0, 3), "rslora": True, "init": "gaussian"},
        ),
        ("houlsby", {"bottleneck_size": 12, "placement": "attn_output", "layers": "1,2", "ln_before": True}),
        ("scaled_parallel", {"scaling": 0.25, "activation": "gelu", "dropout": 0.1}),
    ],
)
def test_json_round_trip_of_changed_values(method: str, params: dict[str, Any]) -> None:
    config = modfit.config(method, **params)
    again = method_entry(method).config_class.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_head_config() -> None:
    head = modfit.head("seq-cls", ["neg", "pos"], pooling="first", dropout=0.0)
    assert head == HeadConfig("seq-cls", ("neg", "pos"), "first", 0.0)
    assert HeadConfig.from_dict(json.loads(json.dumps(head.to_dict()))) == head
    assert modfit.head("mlm").labels == ()
    assert HeadConfig.from_dict({"task": "causal-lm"}) == modfit.head("causal-lm")
    for make, message in (
        (lambda: modfit.head("regression", ["a", "b"]), "head.task: unknown task 'regression'"),
        (lambda: modfit.head("seq-cls", ["only"]), "head.labels: a seq-cls head needs at least 2 labels"),
        (lambda: modfit.head("token-cls"), "head.labels: a token-cls head needs at least 2 labels"),
        (lambda: modfit.head("seq-cls", ["a", "b", "a"]), "head.labels: duplicate label names"),
        (lambda: modfit.head("seq-cls", ["a", "b"], pooling="max"), "head.pooling: unknown pooling 'max'"),
        (lambda: HeadConfig.from_dict({"labels": ["a", "b"]}), "head: missing key 'task'"),
    ):
        with pytest.raises(ConfigError, match=message):
            make()
