"""Prefix tuning learns: held-out accuracy on MiniLM and the demo sentiment data (`heldout.py`)."""

from __future__ import annotations

import pytest

import modfit
from heldout import held_out_accuracy


@pytest.mark.slow
def test_prefix_learns() -> None:
    """Measured (one thread, seed 0, 48 steps, 20 virtual tokens, no MLP: 92,160 parameters on MiniLM,
    plus the head): lr 3e-3: 0.775, 1e-2: 0.82, 3e-2: 0.87, 6e-2: 0.85. Chance is 0.5, LoRA 0.86. The
    default learning rate is 3e-2, thirty times LoRA's."""
    lr = modfit.config("prefix").default_lr
    assert lr == 3e-2
    assert held_out_accuracy("prefix", lr=lr) >= 0.80  # measured 0.87; the head alone reaches ~0.75


@pytest.mark.slow
def test_prefix_with_mlp_reparametrisation_learns() -> None:
    """Measured (as above, prefix_projection=True: 20·384 + MLP 384 -> 384 -> 4,608 = 1,929,600
    parameters): lr 2e-3: 0.90; 1e-2 and 3e-2 diverge (0.52). Its default learning rate is 2e-3."""
    params = {"prefix_projection": True}
    lr = modfit.config("prefix", **params).default_lr
    assert lr == 2e-3
    assert held_out_accuracy("prefix", params, lr=lr) >= 0.78
