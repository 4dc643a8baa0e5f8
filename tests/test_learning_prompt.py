"""Prompt tuning learns: held-out accuracy on MiniLM and the demo sentiment data (`heldout.py`)."""

from __future__ import annotations

import pytest

import modfit
from heldout import held_out_accuracy


@pytest.mark.slow
def test_prompt_learns() -> None:
    """Measured (one thread, seed 0, 48 steps, 20 virtual tokens from random vocabulary rows: 7,680
    parameters on MiniLM, plus the head): lr 1.5e-2: 0.785, 3e-2: 0.815, 1e-1: 0.675, 3e-1: 0.48
    (diverges). Chance is 0.5, LoRA 0.86. The default learning rate is 3e-2, thirty times LoRA's."""
    lr = modfit.config("prompt").default_lr
    assert lr == 3e-2
    assert held_out_accuracy("prompt", lr=lr) >= 0.78  # measured 0.815; the head alone reaches ~0.75
