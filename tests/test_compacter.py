"""Compacter: the PHM layer's Kronecker sum, the shared rule (one parameter, counted and trained
once, still shared after save/load and on the meta device), the fixed rule of learn_phm=False,
the presets' placement, widths and init options. (The shared invariants are in test_conformance.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import transformers

import modfit
from modfit.methods.bottleneck import BottleneckUnit
from modfit.methods.compacter import PHMLayer, kronecker_sum
from modfit.model import ModularModel

if TYPE_CHECKING:
    from conftest import Family


def _phm_layers(mm: ModularModel, name: str = "m") -> list[PHMLayer]:
    layers = []
    for _, unit in mm.units(name):
        assert isinstance(unit, BottleneckUnit)
        assert isinstance(unit.down, PHMLayer) and isinstance(unit.up, PHMLayer)
        layers += [unit.down, unit.up]
    return layers


def test_kronecker_sum() -> None:
    g = torch.Generator().manual_seed(0)
    rule, weight = torch.randn(3, 3, 3, generator=g), torch.randn(3, 2, 5, generator=g)
    expected = sum(torch.kron(rule[i], weight[i]) for i in range(3))
    torch.testing.assert_close(kronecker_sum(rule, weight), expected)


def test_phm_layer_is_a_linear_map_with_kronecker_weight() -> None:
    g = torch.Generator().manual_seed(0)
    n, rank = 4, 2
    rule = {"phm_rule": torch.nn.Parameter(torch.randn(n, n, n, generator=g))}
    weight = {
        "W_left": torch.nn.Parameter(torch.randn(n, 8 // n, rank, generator=g)),
        "W_right": torch.nn.Parameter(torch.randn(n, rank, 12 // n, generator=g)),
    }
    layer = PHMLayer(8, 12, rule, weight)
    with torch.no_grad():
        layer.b.normal_()  # type: ignore[union-attr]
    x = torch.randn(2, 3, 8, generator=g)
    w = torch.bmm(weight["W_left"], weight["W_right"])  # (n, 2, 3)
    h = sum(torch.kron(rule["phm_rule"][i], w[i]) for i in range(n))  # (8, 12)
    torch.testing.assert_close(layer(x), x @ h + layer.b)


def test_rule_is_shared_counted_once_and_trained(tiny: Callable[[str], Family]) -> None:
    bert = tiny("bert")
    mm = modfit.wrap(bert.build())
    mm.add("m", modfit.config("compacter"))
    layers = _phm_layers(mm)
    assert len(layers) == 2 * 2 * 2  # 2 layers × (attention, FFN) × (down, up)
    rule = layers[0].phm_rule
    assert all(layer.phm_rule is rule for layer in layers)
    assert all(layer.W_left is not layers[0].W_left for layer in layers[1:])
    params = mm.module_parameters("m", include_head=False)
    assert sum(p is rule for p in params) == 1
    # hidden 32 / 32 = 1, rounded up to phm_dim 4: per axis 8 and 1
    per_adapter = (4 * 8 + 4 * 1 + 4) + (4 * 1 + 4 * 8 + 32)
    assert mm.trainable_parameters("m") == 4 * per_adapter + 64
    trainable = mm.train_only("m")
    assert any(p is rule for p in trainable)
    with torch.no_grad():  # at the zero init only the up layers' W_right get a gradient, as LoRA's B
        for layer in layers[1::2]:
            layer.W_right.normal_()
    bert.run(mm.model).float().pow(2).mean().backward()
    assert rule.grad is not None and rule.grad.abs().sum() > 0


def test_sharing_survives_save_and_load(tiny: Callable[[str], Family], tmp_path: Path) -> None:
    bert = tiny("bert")
    mm = modfit.wrap(bert.build())
    mm.add("m", modfit.config("compacter", shared_W_phm=True))
    with torch.no_grad():
        for p in mm.module_parameters("m"):
            p.normal_(0, 0.3)
    mm.activate("m")
    expected = bert.run(mm.model)
    mm.save("m", tmp_path / "m")

    mm2 = modfit.wrap(bert.build())
    mm2.load(tmp_path / "m")
    mm2.activate("m")
    torch.testing.assert_close(bert.run(mm2.model), expected, atol=0, rtol=0)
    layers = _phm_layers(mm2)
    assert all(layer.phm_rule is layers[0].phm_rule for layer in layers)
    downs, ups = layers[0::2], layers[1::2]
    assert all(layer.W_left is downs[0].W_left and layer.W_right is downs[0].W_right for layer in downs)
    assert all(layer.W_left is ups[0].W_left for layer in ups)
    assert mm2.trainable_parameters("m") == mm.trainable_parameters("m")


def test_sharing_survives_the_meta_device() -> None:
    with torch.device("meta"):
        model = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2))
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("compacter"))
    layers = _phm_layers(mm)
    assert layers[0].phm_rule.is_meta
    assert all(layer.phm_rule is layers[0].phm_rule for layer in layers)
    assert mm.trainable_parameters("m") == 4 * 2_376 + 64


def test_fixed_rule(tiny: Callable[[str], Family], tmp_path: Path) -> None:
    bert = tiny("bert")
    mm = modfit.wrap(bert.build())
    mm.add("m", modfit.config("compacter", learn_phm=False, init="bert"))
    layers = _phm_layers(mm)
    rule = layers[0].phm_rule
    assert "phm_rule" in dict(layers[0].named_buffers())
    trainable = mm.train_only("m")
    assert not rule.requires_grad and all(p is not rule for p in trainable)
    mm.activate("m")
    expected = bert.run(mm.model)
    mm.save("m", tmp_path / "m")
    mm2 = modfit.wrap(bert.build())
    mm2.load(tmp_path / "m")
    mm2.activate("m")
    assert torch.equal(_phm_layers(mm2)[0].phm_rule, rule)
    torch.testing.assert_close(bert.run(mm2.model), expected, atol=0, rtol=0)


def test_presets(tiny: Callable[[str], Family]) -> None:
    compacter, plus = modfit.config("compacter"), modfit.config("compacter++")
    assert compacter.placement == ("attn_output", "ffn_output")  # type: ignore[attr-defined]
    assert not compacter.original_ln_before  # type: ignore[attr-defined]
    assert plus.placement == ("ffn_output",) and plus.original_ln_before  # type: ignore[attr-defined]
    for config in (compacter, plus):
        assert config.activation == "gelu" and config.reduction_factor == 32  # type: ignore[attr-defined]
        assert (config.phm_dim, config.phm_rank, config.phm_init_range) == (4, 1, 1e-4)  # type: ignore[attr-defined]
    mm = modfit.wrap(tiny("bert").build())
    mm.add("m", plus)
    assert [path for path, _ in mm.units("m")] == [
        "encoder.layer.0.output.dropout",
        "encoder.layer.1.output.dropout",
    ]


def test_adapters_init_is_near_identity(tiny: Callable[[str], Family]) -> None:
    bert = tiny("bert")
    model = bert.build()
    base = bert.run(model)
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("compacter", init="bert"))
    mm.activate("m")
    diff = (bert.run(model) - base).abs().max()
    assert 0 < diff < 1e-3  # the rule's 1e-4 scale keeps H tiny, not zero


def test_widths_and_options(tiny: Callable[[str], Family]) -> None:
    config = modfit.config("compacter")
    assert config.inner_size(768) == 24  # type: ignore[attr-defined]
    assert config.inner_size(32) == 4  # type: ignore[attr-defined]  (1, rounded up to phm_dim)
    assert config.replace(bottleneck_size=8).inner_size(32) == 8  # type: ignore[attr-defined]
    for params, message in (
        ({"bottleneck_size": 6}, r"compacter\.bottleneck_size: 6 is not divisible by phm_dim 4"),
        ({"init": "houlsby"}, r"compacter\.init: PHM layers support 'zero_up' and 'bert'"),
        ({"phm_dim": 0}, r"compacter\.phm_dim: must be >= 1"),
        ({"phm_c_init": "xavier"}, r"compacter\.phm_c_init: 'xavier' is not one of 'normal', 'uniform'"),
        ({"phm_rank": 0}, r"compacter\+\+\.phm_rank: must be >= 1"),
    ):
        method = "compacter++" if "phm_rank" in params else "compacter"
        with pytest.raises(modfit.ConfigError, match=message):
            modfit.config(method, **params)
    mm = modfit.wrap(tiny("bert").build())
    with pytest.raises(ValueError, match=r"compacter\.phm_dim: the model width 32 is not divisible by 3"):
        mm.add("m", modfit.config("compacter", phm_dim=3))
    assert mm.module_names == []
