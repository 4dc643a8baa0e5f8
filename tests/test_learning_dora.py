"""DoRA learns: held-out accuracy on MiniLM and the demo sentiment data (`heldout.py`)."""

from __future__ import annotations

import pytest

from heldout import held_out_accuracy


@pytest.mark.slow
def test_dora_learns() -> None:
    """Measured (one thread, seed 0, 48 steps, r=8 alpha=16 on query and value: 78,336 parameters):
    lr 2e-3: 0.86 (LoRA at the same settings: 0.86); lr 5e-3: 0.90. Chance is 0.5."""
    assert held_out_accuracy("dora", {"r": 8, "alpha": 16}, lr=5e-3) >= 0.80
