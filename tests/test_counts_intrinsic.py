"""Trainable-parameter counts of `intrinsic` on BERT-base: d, plus one λ per targeted tensor with SAID.

Neither PEFT nor AdapterHub `adapters` has intrinsic-dimension fine-tuning, so the reference is the
definition (Aghajanyan et al. 2021, arXiv:2012.13255, eq. 3): θ_d has d entries and SAID adds one
scalar λ_i per reparametrised tensor. (The SAID code counts the λ_i inside its d; modfit's `d` is
the size of θ_d alone.) BERT-base has 12 layers × 6 projections (query, key, value, attention
output, FFN in, FFN out) = 72 weight tensors.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import modfit
from modfit.methods.intrinsic import IntrinsicUnit
from modfit.model import ModularModel

L, PROJECTIONS = 12, 6


@pytest.fixture(scope="module")
def bert_base() -> ModularModel:
    with torch.device("meta"):  # shapes only: counting needs no weights (nor Fastfood factors)
        model = transformers.BertModel(transformers.BertConfig())
    return modfit.wrap(model)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, 4096 + L * PROJECTIONS),  # defaults: d=4096, SAID, all layer projections: 4,168
        ({"d": 1000}, 1000 + L * PROJECTIONS),
        ({"said": False}, 4096),
        ({"d": 5000, "said": False}, 5000),
        ({"d": 500, "targets": ("query", "value")}, 500 + L * 2),
        ({"d": 1000, "targets": ("ffn_in", "ffn_out"), "layers": (0, 11)}, 1000 + 2 * 2),
        ({"layers": (3,)}, 4096 + PROJECTIONS),
    ],
)
def test_module_parameter_count(bert_base: ModularModel, params: dict[str, object], expected: int) -> None:
    mm = bert_base
    mm.add("m", modfit.config("intrinsic", **params))
    try:
        assert mm.trainable_parameters("m") == expected
        assert sum(p.numel() for p in mm.module_parameters("m", include_head=False)) == expected
        # θ_d is one tensor however many units share it
        thetas = {id(unit.theta_d) for _, unit in mm.units("m") if isinstance(unit, IntrinsicUnit)}
        assert len(thetas) == 1
    finally:
        mm.remove("m")


def test_defaults_by_hand() -> None:
    assert 4096 + L * PROJECTIONS == 4_168
    assert 1000 + L * PROJECTIONS == 1_072
