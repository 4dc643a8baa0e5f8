"""DoRA against the paper's formula computed by hand, on a Linear (BERT) and a Conv1D (GPT-2) site.

W' = m ⊙ V / ||V||_c with V = W + s·BA, the norm per output feature over the input dimension and
detached from the gradient (Liu et al. 2024, §4.3); outputs x W'ᵀ + b.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

import modfit
from modfit.methods.dora import DoraUnit

if TYPE_CHECKING:
    from conftest import Family

SITES = {"bert": "encoder.layer.0.attention.self.query", "gpt2": "h.0.attn.c_attn"}


def _setup(family: Family, **params: object) -> tuple[modfit.ModularModel, nn.Module, DoraUnit]:
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("d", modfit.config("dora", **params))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mm.module_parameters("d", include_head=False):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # magnitude stays near ||W||_c
    mm.activate("d")
    path = SITES[family.name]
    unit = dict(mm.units("d"))[path]
    assert isinstance(unit, DoraUnit)
    return mm, mm.view.module(path), unit


def _reference(module: nn.Module, unit: DoraUnit, x: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """x W'ᵀ + b from the formula, in the (out, in) layout whatever the module stores."""
    weight = module.weight
    w = weight.t() if unit.fan_in_fan_out else weight  # (out, in)
    v = w + unit.scale * unit.lora_B @ unit.lora_A
    norm = v.norm(dim=1)
    if detach:
        norm = norm.detach()
    w_prime = (unit.magnitude / norm)[:, None] * v
    return x @ w_prime.t() + module.bias


@pytest.mark.parametrize("name", sorted(SITES))
def test_output_and_gradients_match_the_formula(name: str, tiny: Callable[[str], Family]) -> None:
    _, module, unit = _setup(tiny(name))
    x = torch.randn(3, 5, module.weight.shape[0 if unit.fan_in_fan_out else 1])
    params = [unit.magnitude, unit.lora_A, unit.lora_B]

    out = module(x)  # the site's hook applies the unit
    expected = _reference(module, unit, x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)

    grads = torch.autograd.grad(out.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # The norm is a constant: differentiating through it would give other gradients for A and B.
    through = torch.autograd.grad(_reference(module, unit, x, detach=False).square().sum(), params)
    assert not torch.allclose(through[2], expected_grads[2], atol=1e-6, rtol=1e-4)


def test_magnitude_starts_at_the_column_norm(tiny: Callable[[str], Family]) -> None:
    for name in SITES:
        mm = modfit.wrap(tiny(name).build())
        mm.add("d", modfit.config("dora"))
        for path, unit in mm.units("d"):
            assert isinstance(unit, DoraUnit)
            weight = mm.view.module(path).weight
            w = weight.t() if unit.fan_in_fan_out else weight
            assert unit.magnitude.shape == (w.shape[0],)  # one per output feature
            assert torch.equal(unit.magnitude, torch.linalg.vector_norm(w, dim=1))


def test_reads_the_base_output_not_other_units(tiny: Callable[[str], Family]) -> None:
    """Parameter units compose as a sum of deltas on W: DoRA rescales W x, not another LoRA's share."""
    family = tiny("bert")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("l", modfit.config("lora"))
    mm.add("d", modfit.config("dora"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("l", "d"):
            for p in mm.module_parameters(name, include_head=False):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    with torch.no_grad():
        mm.activate("stack(l, d)")
        ld = family.run(model)
        mm.activate("stack(d, l)")
        dl = family.run(model)
    torch.testing.assert_close(ld, dl, atol=1e-6, rtol=0)


def test_dropout_uses_the_same_input_for_both_terms(tiny: Callable[[str], Family]) -> None:
    mm, module, unit = _setup(tiny("bert"), dropout=0.5)
    x = torch.randn(3, 5, module.weight.shape[1])
    with torch.no_grad():
        mm.model.eval()
        unit.eval()
        torch.testing.assert_close(module(x), _reference(module, unit, x), atol=1e-6, rtol=1e-5)
        unit.train()
        torch.manual_seed(7)
        out = module(x)
        torch.manual_seed(7)
        dropped = nn.functional.dropout(x, 0.5, training=True)
        base = x @ module.weight.t() + module.bias
        expected = base + _reference(module, unit, dropped) - (dropped @ module.weight.t() + module.bias)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SITES))
def test_merge_writes_w_prime_and_unmerge_restores(name: str, tiny: Callable[[str], Family]) -> None:
    mm, module, unit = _setup(tiny(name))
    before = module.weight.detach().clone()
    with torch.no_grad():
        unit.magnitude[0] = 0.0  # a ratio of 0 cannot be divided back out: the unit keeps W
        w = before.t() if unit.fan_in_fan_out else before
        v = w + unit.scale * unit.lora_B @ unit.lora_A
        w_prime = (unit.magnitude / v.norm(dim=1))[:, None] * v
    mm.merge("d")
    merged = module.weight.t() if unit.fan_in_fan_out else module.weight
    torch.testing.assert_close(merged, w_prime, atol=1e-7, rtol=1e-6)
    mm.unmerge("d")
    assert torch.equal(module.weight, before)  # from the copy
    with torch.no_grad():
        unit.magnitude[0] = 0.5
    mm.merge("d")
    mm.unmerge("d")  # from the ratio: up to rounding
    torch.testing.assert_close(module.weight, before, atol=1e-7, rtol=1e-6)


def test_errors_name_dora() -> None:
    with pytest.raises(modfit.ConfigError, match=r"^dora\.r:"):
        modfit.config("dora", r=0)
