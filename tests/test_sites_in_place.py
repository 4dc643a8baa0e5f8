"""A unit writing into the watched module's output in place (`SiteCall.writable`): only when nothing
else can see that output, and with the same result as the out-of-place path."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modfit
from modfit.methods.lora import LoraUnit
from modfit.sites import Site, SiteCall, Unit

if TYPE_CHECKING:
    from conftest import Family


class Spy(Unit):
    """Records `call.writable` and leaves h as it is."""

    writes_in_place = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        self.seen.append(call.writable)
        return h


class PlainSpy(Spy):
    writes_in_place = False


def _site(module: nn.Module, *units: Unit) -> Site:
    site = Site("m", module)
    for i, unit in enumerate(units):
        site.add_unit(f"u{i}", unit)
    site.set_active([f"u{i}" for i in range(len(units))])
    return site


X = torch.randn(2, 3, 8)


def test_writable_in_inference_for_a_lone_unit() -> None:
    spy = Spy()
    linear = nn.Linear(8, 8)
    _site(linear, spy)
    with torch.no_grad():
        linear(X)
    with torch.inference_mode():
        linear(X)
    linear(X)  # gradient recorded
    assert spy.seen == [True, True, False]


def test_not_writable_for_a_unit_that_does_not_ask() -> None:
    spy = PlainSpy()
    linear = nn.Linear(8, 8)
    _site(linear, spy)
    with torch.no_grad():
        linear(X)
    assert spy.seen == [False]


def test_not_writable_beside_another_unit() -> None:
    first, second = Spy(), Spy()
    linear = nn.Linear(8, 8)
    _site(linear, first, second)
    with torch.no_grad():
        linear(X)
    assert first.seen == second.seen == [False]


def test_not_writable_when_another_hook_may_hold_the_output() -> None:
    kept: list[torch.Tensor] = []
    spy = Spy()
    linear = nn.Linear(8, 8)
    handle = linear.register_forward_hook(lambda module, args, output: kept.append(output))
    _site(linear, spy)
    with torch.no_grad():
        linear(X)
    handle.remove()
    global_handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        with torch.no_grad():
            linear(X)
    finally:
        global_handle.remove()
    with torch.no_grad():
        linear(X)
    assert spy.seen == [False, False, True]


@pytest.mark.parametrize("module", [nn.Identity(), nn.Dropout(0.1).eval()], ids=["identity", "dropout-eval"])
def test_not_writable_when_the_output_is_the_input(module: nn.Module) -> None:
    spy = Spy()
    _site(module, spy)
    with torch.no_grad():
        module(X)
    assert spy.seen == [False]


def _lora_site(kept: list[torch.Tensor] | None = None) -> tuple[nn.Linear, LoraUnit]:
    """A LoRA site on a Linear; with `kept`, a hook registered before the site keeps each output."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)
    if kept is not None:
        linear.register_forward_hook(lambda module, args, output: kept.append(output))
    unit = LoraUnit(8, 6, r=2, alpha=4)
    nn.init.normal_(unit.lora_B)
    _site(linear, unit)
    return linear, unit


def test_lora_in_place_equals_out_of_place() -> None:
    linear, unit = _lora_site()
    with torch.no_grad():
        expected = F.linear(X, linear.weight, linear.bias) + 2.0 * (X @ unit.lora_A.t() @ unit.lora_B.t())
        in_place = linear(X)
    out_of_place = linear(X).detach()  # gradient recorded: a new tensor
    assert torch.equal(in_place, out_of_place)
    torch.testing.assert_close(in_place, expected, atol=1e-6, rtol=0)


def test_lora_leaves_an_earlier_hooks_output_alone() -> None:
    kept: list[torch.Tensor] = []
    linear, _ = _lora_site(kept)
    with torch.no_grad():
        out = linear(X)
        torch.testing.assert_close(kept[0], F.linear(X, linear.weight, linear.bias), atol=0, rtol=0)
    assert not torch.equal(out, kept[0])


def test_model_output_in_inference_equals_the_recorded_forward(
    monkeypatch: pytest.MonkeyPatch, tiny: Callable[[str], Family]
) -> None:
    """A whole model with LoRA on query and value: the no-grad forward (in place for one module, out
    of place for a stack of two at the same sites) equals the forward that records gradients."""
    writable: list[bool] = []
    forward = LoraUnit.forward

    def spying(self: LoraUnit, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        writable.append(call.writable)
        return forward(self, h, call)

    monkeypatch.setattr(LoraUnit, "forward", spying)
    bert = tiny("bert")
    mm = modfit.wrap(bert.build())  # eval mode
    for name in ("a", "b"):
        mm.add(name, modfit.config("lora", r=2))
        with torch.no_grad():
            for p in mm.module_parameters(name):
                p.normal_(0, 0.1)
    for composition, in_place in (("a", True), ("stack(a, b)", False)):
        mm.activate(composition)
        writable.clear()
        with torch.no_grad():
            in_inference = bert.run(mm.model)
        assert writable and set(writable) == {in_place}
        writable.clear()
        recorded = bert.run(mm.model).detach()
        assert writable and set(writable) == {False}
        torch.testing.assert_close(in_inference, recorded, atol=1e-6, rtol=0)
