"""Unions learn: held-out accuracy on MiniLM and the demo sentiment data (`heldout.py`)."""

from __future__ import annotations

import pytest

import modfit
from heldout import held_out_accuracy


@pytest.mark.slow
def test_unipelt_learns() -> None:
    """Measured (one thread, seed 0, 48 steps): lr 2e-3 (the default, the prefix MLP's): 0.895;
    5e-3: 0.885. Chance is 0.5, LoRA 0.86, the head alone about 0.75."""
    lr = modfit.config("unipelt").default_lr
    assert lr == 2e-3
    assert held_out_accuracy("unipelt", lr=lr) >= 0.82


@pytest.mark.slow
def test_mam_learns() -> None:
    """Measured (as above): lr 5e-4 (the default): 0.87; 1e-3: 0.865; 1.5e-3: 0.84; 2e-3: 0.52
    (diverges)."""
    lr = modfit.config("mam").default_lr
    assert lr == 5e-4
    assert held_out_accuracy("mam", lr=lr) >= 0.80


@pytest.mark.slow
def test_default_union_learns() -> None:
    """Measured (as above, lora + pfeiffer at their defaults): lr 2e-3: 0.90."""
    assert held_out_accuracy("union", lr=2e-3) >= 0.82
