"""Compacter and a gated bottleneck adapter learn: held-out accuracy on MiniLM and the demo sentiment
data (`heldout.py`)."""

from __future__ import annotations

import statistics

import pytest

import modfit
from heldout import held_out_accuracy


@pytest.mark.slow
def test_compacter_learns() -> None:
    """Measured (one thread, seed 0, 48 steps, adapters' CompacterConfig defaults, torch's dropout):
    lr 3e-3: 0.77, 5e-3: 0.83, 1e-2: 0.83, 2e-2: 0.78, 3e-2: 0.755; 96 steps at 1e-2: 0.84; adapters'
    own init (`init="bert"`) at 1e-2: 0.83. At 1e-2 over seeds 0..5: torch's dropout 0.83, 0.835,
    0.83, 0.81, 0.845, 0.815; modfit's fast dropout (the default) 0.795, 0.855, 0.835, 0.815, 0.82,
    0.775. Compacter starts slowly: the shared rule starts at N(0, 1e-4), so the adapters' effective
    weights stay small for the first steps. The head trained alone (units frozen) reaches 0.77 at
    lr 1e-2 (seeds 0 and 1), so the threshold 0.80 sits between the two; the median of three seeds
    (0.835 for seeds 0..2), because one seed alone can fall either side."""
    lr = modfit.config("compacter").default_lr  # what `modfit train` uses without --lr
    assert lr == 1e-2
    assert statistics.median(held_out_accuracy("compacter", lr=lr, seed=seed) for seed in (0, 1, 2)) >= 0.80


@pytest.mark.slow
def test_gated_adapter_learns() -> None:
    """Pfeiffer with `use_gating=True`, measured (one thread, seed 0, 48 steps): lr 2e-3: 0.84, 5e-3:
    0.84 (plain Pfeiffer at 2e-3: 0.855); seed 1 at 2e-3: 0.875. The head trained alone reaches 0.74
    at lr 2e-3."""
    assert held_out_accuracy("pfeiffer", {"use_gating": True}, lr=2e-3) >= 0.80
