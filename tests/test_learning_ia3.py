"""(IA)³ learns: held-out accuracy on MiniLM and the demo sentiment data (`heldout.py`)."""

from __future__ import annotations

import pytest

import modfit
from heldout import held_out_accuracy


@pytest.mark.slow
def test_ia3_learns() -> None:
    """Measured (one thread, 48 steps, default placement: 6 × (384 + 384 + 384 + 1536) = 16,128 scalings
    on MiniLM), seed 0: lr 1e-2: 0.815, 2e-2: 0.84, 3e-2: 0.85, 5e-2: 0.88, 1e-1: 0.745 (too large);
    at 3e-2 seeds 1 and 2 give 0.84 and 0.85 (at 5e-2 seed 1 drops to 0.82, so 3e-2 is the steadier
    default). Far larger rates than LoRA's 2e-3 (0.86). The seq-cls head trains alongside; trained alone
    (units frozen) it reaches 0.765 at lr 3e-2 (0.74-0.775 from 2e-3 to 5e-2), so 0.80 asks for a gain
    from the scalings themselves, 0.05 below the measured 0.85."""
    lr = modfit.config("ia3").default_lr  # what `modfit train` uses without --lr
    assert lr == 3e-2
    assert held_out_accuracy("ia3", lr=lr) >= 0.80
