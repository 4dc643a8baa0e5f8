"""Invertible adapters (MAD-X): the coupling really inverts, the LM head sees the inverse, counts."""

from __future__ import annotations

import pytest
import torch
import transformers

import modfit
from conftest import FAMILIES
from modfit.methods.invertible import InvertibleUnit


def _randomise(mm: modfit.ModularModel, name: str) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mm.module_parameters(name, include_head=False):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("hidden", [8, 9, 768])
def test_inverse_inverts(hidden: int) -> None:
    unit = InvertibleUnit(hidden, 2.0, "relu")
    with torch.no_grad():
        for p in unit.parameters():
            p.normal_(0, 1.0 / hidden**0.5)
        x = torch.randn(3, 5, hidden)
        y = unit.couple(x)
        assert (y - x).abs().max() > 1e-2  # not the identity
        torch.testing.assert_close(unit.invert(y), x, rtol=0, atol=1e-5)
        torch.testing.assert_close(unit.couple(unit.invert(x)), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family_name", ["bert", "gpt2", "distilbert", "llama", "t5"])
def test_coupling_acts_on_the_first_layer_input(family_name: str) -> None:
    family = FAMILIES[family_name]
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("inv", modfit.config("invertible"))
    _randomise(mm, "inv")
    ((path, unit), *_rest) = list(mm.units("inv"))
    seen: list[torch.Tensor] = []
    layer = mm.view.module(path)

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else next(v for k, v in kwargs.items() if k in ("hidden_states", "x")))

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            family.run(model)  # base: the raw input of the first layer
            mm.activate("inv")
            family.run(model)
    finally:
        handle.remove()
    # hooks registered later run later: our grab sees the input after the coupling
    base_in, coupled_in = seen[0], seen[len(seen) // 2]
    with torch.no_grad():
        torch.testing.assert_close(coupled_in, unit.couple(base_in), rtol=0, atol=1e-5)


def test_mlm_head_sees_the_inverse() -> None:
    family = FAMILIES["bert"]
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("lang", modfit.config("pfeiffer_inv"), head=modfit.head("mlm"))
    _randomise(mm, "lang")
    mm.eval()
    ids = torch.randint(3, 60, (2, 6))
    mm.activate("lang")
    with torch.no_grad():
        logits = mm(input_ids=ids).logits
        hidden = mm.model(input_ids=ids)[0]
        (inv,) = [p for _, u in mm.units("lang") for p in u.parts() if isinstance(p, InvertibleUnit)]
        expected = mm.head_module("lang")(inv.invert(hidden), None)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_counts_equal_adapters_on_bert_base() -> None:
    """adapters 1.3.0, BertModel(BertConfig()) + SeqBnInvConfig(): 1,190,592 parameters, of which the
    NICE block (F and G: 384 -> 192 -> 384) is 296,064 (`invertible_adapters.<name>.F.0.weight` ...)."""
    with torch.device("meta"):
        model = transformers.BertModel(transformers.BertConfig())
    mm = modfit.wrap(model)
    mm.add("inv", modfit.config("invertible"))
    mm.add("madx", modfit.config("pfeiffer_inv"))
    assert mm.trainable_parameters("inv") == 296_064
    assert mm.trainable_parameters("madx") == 1_190_592
