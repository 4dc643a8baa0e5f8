"""Sibling LoRA units share one down-projection in inference (`siblings.py`, `methods/lora_shared.py`):
grouped at each activation, one product per group per input, the same outputs as without sharing,
and never a stale or borrowed result (another input, an input or A changed in place, another rank)."""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modfit
from modfit.methods import lora, lora_shared
from modfit.methods.lora import LoraUnit
from modfit.siblings import SiblingGroup, group_siblings
from modfit.sites import Site

if TYPE_CHECKING:
    from conftest import Family


class DownProjections:
    """Stands in for `torch.nn.functional` in LoRA's two modules and records the rows of every
    weight their F.linear calls get (r for a unit's own product, 2r for a stacked one)."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self.rows.append(weight.shape[0])
        return F.linear(x, weight, bias)


@pytest.fixture
def down_projections(monkeypatch: pytest.MonkeyPatch) -> DownProjections:
    spy = DownProjections()
    monkeypatch.setattr(lora, "F", spy)
    monkeypatch.setattr(lora_shared, "F", spy)
    return spy


def _model(
    tiny: Callable[[str], Family], names: tuple[str, ...] = ("a",)
) -> tuple[modfit.ModularModel, Family]:
    bert = tiny("bert")
    mm = modfit.wrap(bert.build())  # eval mode
    for name in names:
        mm.add(name, modfit.config("lora", r=2))
        with torch.no_grad():
            for p in mm.module_parameters(name):
                p.normal_(0, 0.1)
    return mm, bert


def _groups(mm: modfit.ModularModel, name: str) -> dict[str, SiblingGroup | None]:
    return {path: unit.siblings for path, unit in mm.units(name)}


def test_query_and_value_of_a_layer_are_grouped_while_running_alone(tiny: Callable[[str], Family]) -> None:
    mm, _ = _model(tiny, ("a", "b"))
    assert set(_groups(mm, "a").values()) == {None}  # nothing active yet
    mm.activate("a")
    groups = _groups(mm, "a")
    for layer in (0, 1):
        query = groups[f"encoder.layer.{layer}.attention.self.query"]
        assert query is not None and query is groups[f"encoder.layer.{layer}.attention.self.value"]
        assert len(query.units) == 2
    assert (
        groups["encoder.layer.0.attention.self.query"] is not groups["encoder.layer.1.attention.self.query"]
    )
    mm.activate("b")
    assert set(_groups(mm, "a").values()) == {None}  # an inactive module keeps no group
    assert None not in _groups(mm, "b").values()
    mm.activate("stack(a, b)")  # two units at each site: none runs alone
    assert set(_groups(mm, "a").values()) == set(_groups(mm, "b").values()) == {None}
    mm.activate("a")
    mm.deactivate()
    assert set(_groups(mm, "a").values()) == {None}


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_one_down_projection_per_layer_and_the_same_outputs(
    tiny: Callable[[str], Family], down_projections: DownProjections, mode: str
) -> None:
    mm, bert = _model(tiny)
    mm.activate("a")
    expected = bert.run(mm.model).detach()  # gradient recorded: each unit its own product
    assert down_projections.rows == [2] * 4  # 2 layers x (query, value)
    down_projections.rows.clear()
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        out = bert.run(mm.model)
    assert down_projections.rows == [4] * 2  # 2 layers x one stacked product
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_train_mode_without_gradients_does_not_share(
    tiny: Callable[[str], Family], down_projections: DownProjections
) -> None:
    mm, bert = _model(tiny)
    mm.activate("a")
    mm.train()  # dropout would draw one mask per unit
    with torch.no_grad():
        bert.run(mm.model)
    assert down_projections.rows == [2] * 4


def _pair(ranks: tuple[int, int] = (2, 2)) -> tuple[nn.Module, LoraUnit, LoraUnit]:
    """Two Linear siblings under one parent, a LoRA unit alone at each, grouped, in eval mode."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q, parent.v = nn.Linear(8, 6), nn.Linear(8, 6)
    sites = []
    units = []
    for child, r in zip(("q", "v"), ranks, strict=True):
        unit = LoraUnit(8, 6, r=r, alpha=4)
        nn.init.normal_(unit.lora_B)
        site = Site(f"p.{child}", getattr(parent, child))
        site.add_unit("m", unit)
        site.set_active(["m"])
        sites.append(site)
        units.append(unit.eval())
    group_siblings(sites)
    parent.sites = nn.ModuleList(sites)  # keeps the sites (and their hooks) alive
    return parent, units[0], units[1]


def _expected(linear: nn.Linear, unit: LoraUnit, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, linear.weight, linear.bias) + unit.scale * (x @ unit.lora_A.t() @ unit.lora_B.t())


@pytest.mark.parametrize("ranks", [(2, 2), (2, 3)])
def test_siblings_on_other_inputs_get_their_own(ranks: tuple[int, int]) -> None:
    parent, uq, uv = _pair(ranks)
    assert uq.siblings is uv.siblings is not None
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    # q on x keeps v's columns for x, which v on y must not take; v on y and each v on x compute
    # the stacked product for their input and keep q's columns; the last q on x takes those
    calls = [(parent.q, uq, x), (parent.v, uv, y), (parent.v, uv, x), (parent.v, uv, x), (parent.q, uq, x)]
    with torch.no_grad():
        for linear, unit, inputs in calls:
            torch.testing.assert_close(linear(inputs), _expected(linear, unit, inputs), atol=1e-6, rtol=0)


def test_the_second_sibling_takes_the_kept_columns(down_projections: DownProjections) -> None:
    parent, _, uv = _pair((2, 3))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        parent.q(x)
        assert down_projections.rows == [5]  # both units' A stacked: 2 + 3 rows
        torch.testing.assert_close(parent.v(x), _expected(parent.v, uv, x), atol=1e-6, rtol=0)
    assert down_projections.rows == [5]  # nothing computed again
    parent.v(x)  # gradient recorded: its own product
    assert down_projections.rows == [5, 3]


def test_an_input_changed_in_place_is_projected_again() -> None:
    parent, _, uv = _pair()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        parent.q(x)
        x.mul_(2.0)
        torch.testing.assert_close(parent.v(x), _expected(parent.v, uv, x), atol=1e-6, rtol=0)


def test_an_a_changed_in_place_is_not_read_stale() -> None:
    parent, _, uv = _pair()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        parent.q(x)
        uv.lora_A.add_(0.5)
        torch.testing.assert_close(parent.v(x), _expected(parent.v, uv, x), atol=1e-6, rtol=0)


def test_kept_columns_keep_no_input_alive() -> None:
    parent = _pair()[0]
    x = torch.randn(2, 5, 8)
    alive = weakref.ref(x)
    with torch.no_grad():
        parent.q(x)
    del x
    gc.collect()
    assert alive() is None


def test_a_deep_copy_keeps_its_groups(tiny: Callable[[str], Family]) -> None:
    mm, bert = _model(tiny)
    mm.activate("a")
    with torch.no_grad():
        bert.run(mm.model)  # leaves nothing kept behind, but the copy must not share scratch anyway
    twin = copy.deepcopy(mm)
    groups = _groups(twin, "a")
    assert None not in groups.values()
    assert not set(groups.values()) & set(_groups(mm, "a").values())  # its own groups
    with torch.no_grad():
        torch.testing.assert_close(bert.run(twin.model), bert.run(mm.model), atol=0, rtol=0)
