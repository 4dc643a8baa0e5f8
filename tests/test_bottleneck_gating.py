"""Bottleneck adapters with learned scaling ("learned", "channel") and gating: config parsing, the
formula against hand computation (as adapters' `Adapter.forward`), identity at init, save/load and
gradients. The presets' defaults are unchanged (test_counts, test_config)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

import modfit
from modfit.methods.bottleneck import BottleneckUnit
from modfit.model import ModularModel

if TYPE_CHECKING:
    from conftest import Family

OPTIONS = [
    ("pfeiffer", {"use_gating": True}),
    ("pfeiffer", {"scaling": "learned"}),
    ("houlsby", {"scaling": "channel", "use_gating": True}),
    ("parallel", {"scaling": "channel", "use_gating": True}),
    ("compacter", {"scaling": "learned", "use_gating": True}),
]


@torch.no_grad()
def _randomise(mm: ModularModel, name: str = "m", seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in mm.module_parameters(name, include_head=False):
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _units(mm: ModularModel, name: str = "m") -> list[BottleneckUnit]:
    return [unit for _, unit in mm.units(name) if isinstance(unit, BottleneckUnit)]


def test_scaling_values() -> None:
    assert modfit.config("pfeiffer", scaling="2.0").scaling == 2.0  # type: ignore[attr-defined]
    assert modfit.config("pfeiffer", scaling=3).scaling == 3.0  # type: ignore[attr-defined]
    assert modfit.config("pfeiffer", scaling="learned").scaling == "learned"  # type: ignore[attr-defined]
    assert modfit.config("scaled_parallel", scaling="channel").scaling == "channel"  # type: ignore[attr-defined]
    assert modfit.config("pfeiffer", use_gating="true").use_gating is True  # type: ignore[attr-defined]
    with pytest.raises(modfit.ConfigError, match=r"pfeiffer\.scaling: expected a number or one of 'learned'"):
        modfit.config("pfeiffer", scaling="learnt")
    with pytest.raises(
        modfit.ConfigError, match=r"pfeiffer\.scaling: expected a number, 'learned' or 'channel'"
    ):
        modfit.config("pfeiffer").replace(scaling="learnt")
    with pytest.raises(modfit.ConfigError, match=r"pfeiffer\.scaling: expected a number"):
        modfit.config("pfeiffer").replace(scaling=float("nan"))


@pytest.mark.parametrize(("method", "params"), OPTIONS)
def test_identity_then_changes_then_save_load(
    tiny: Callable[[str], Family], tmp_path: Path, method: str, params: dict[str, Any]
) -> None:
    bert = tiny("bert")
    model = bert.build()
    base = bert.run(model)
    mm = modfit.wrap(model)
    mm.add("m", modfit.config(method, **params), head=modfit.head("seq-cls", ["a", "b"]))
    mm.activate("m")
    assert torch.equal(bert.run(model), base)
    _randomise(mm)
    out = bert.run(model)
    assert (out - base).abs().max() > 1e-4
    mm.save("m", tmp_path / "m")
    mm2 = modfit.wrap(bert.build())
    mm2.load(tmp_path / "m")
    mm2.activate("m")
    assert torch.equal(bert.run(mm2.model), out)
    with pytest.raises(ValueError, match="cannot be merged"):
        mm.merge("m")


@pytest.mark.parametrize(("method", "params"), OPTIONS)
def test_gate_and_scaling_train(tiny: Callable[[str], Family], method: str, params: dict[str, Any]) -> None:
    bert = tiny("bert")
    mm = modfit.wrap(bert.build())
    mm.add("m", modfit.config(method, **params))
    _randomise(mm)
    mm.train_only("m")
    bert.run(mm.model).pow(2).mean().backward()
    for unit in _units(mm):
        if unit.gate is not None:
            assert unit.gate.weight.grad is not None and unit.gate.weight.grad.abs().sum() > 0
        if isinstance(unit.scaling, nn.Parameter):
            assert unit.scaling.grad is not None and unit.scaling.grad.abs().sum() > 0


def test_formula_as_adapters(tiny: Callable[[str], Family]) -> None:
    """h' = h + g · s ⊙ up(act(down(h))), g = mean over the sequence of sigmoid(gate(h)) per example."""
    bert = tiny("bert")
    mm = modfit.wrap(bert.build())
    mm.add("m", modfit.config("houlsby", scaling="channel", use_gating=True))
    _randomise(mm)
    unit = _units(mm)[0]
    assert isinstance(unit.scaling, nn.Parameter) and unit.scaling.shape == (32,)
    assert unit.gate is not None
    h = torch.randn(2, 5, 32)
    call = modfit.sites.SiteCall(inputs=(h,), residual=torch.randn(2, 5, 32), norm=None, base=nn.Identity())
    with torch.no_grad():
        got = unit(h, call)
        branch = unit.up(unit.act(unit.down(h))) * unit.scaling
        gate = torch.sigmoid(unit.gate(h)).mean(dim=1).unsqueeze(-1)  # adapters: (batch, 1, 1)
    assert gate.shape == (2, 1, 1)
    torch.testing.assert_close(got, h + branch * gate)


def test_learned_scalar_and_gate_init(tiny: Callable[[str], Family]) -> None:
    mm = modfit.wrap(tiny("bert").build())
    mm.add("m", modfit.config("pfeiffer", scaling="learned", use_gating=True))
    for unit in _units(mm):
        assert isinstance(unit.scaling, nn.Parameter)
        assert torch.equal(unit.scaling.data, torch.ones(1))
        assert unit.gate is not None and torch.equal(unit.gate.bias.data, torch.zeros(1))
        assert unit.gate.weight.std() < 0.05  # N(0, 0.02), as adapters' BERT init
    mm.add("plain", modfit.config("pfeiffer"))
    assert all(unit.gate is None and unit.scaling == 1.0 for unit in _units(mm, "plain"))
