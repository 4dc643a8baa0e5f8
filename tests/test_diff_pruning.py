"""Diff pruning (`methods/diff_pruning.py`): the hard-concrete gate and its expected L0, the
regularizer channel into the loss, and the sparse form that `finalize` saves."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import modfit
from modfit.distributed import _LossModule
from modfit.methods.diff_pruning import (
    BETA,
    GAMMA,
    ZETA,
    DiffPruningUnit,
    deterministic_gate,
    expected_l0,
    finalize,
    hard_concrete,
)
from modfit.methods.sft import sparse_diff
from modfit.model import ModularModel
from modfit.persistence import WEIGHTS
from modfit.train import TrainSettings, train
from train_fixtures import SEQ_LABELS, collate_fn, seq_cls_features, tiny_bert, tiny_bert_classifier

TINY_ENTRIES = 2 * (4 * 32 * 32 + 2 * 37 * 32)  # the projection weights of train_fixtures.tiny_bert


def _model(**params: object) -> ModularModel:
    mm = modfit.wrap(tiny_bert())
    mm.add("d", modfit.config("diff_pruning", **params), head=modfit.head("seq-cls", SEQ_LABELS, dropout=0.0))
    mm.activate("d")
    return mm


def _units(mm: ModularModel) -> list[DiffPruningUnit]:
    units = [u for _, u in mm.units("d")]
    assert all(isinstance(u, DiffPruningUnit) for u in units)
    return units  # type: ignore[return-value]


@torch.no_grad()
def _randomise(mm: ModularModel, seed: int = 1) -> None:
    """w ~ N(0, 0.1²); log α ~ N(0, 2²), so that some gates are shut and some open."""
    g = torch.Generator().manual_seed(seed)
    for unit in _units(mm):
        assert unit.w is not None and unit.gate is not None
        unit.w.copy_(torch.randn(unit.w.shape, generator=g) * 0.1)
        unit.gate.copy_(torch.randn(unit.gate.shape, generator=g) * 2.0 / unit.gate_lr_scale)


def _inputs() -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([[1, 5, 9, 13, 2], [1, 14, 6, 2, 0]]),
        "attention_mask": torch.ones(2, 5),
    }


# -- the gate ----------------------------------------------------------------------------------


def test_hard_concrete_formula() -> None:
    log_alpha = torch.tensor([0.0, 0.0, 2.0, -30.0, 30.0])
    u = torch.tensor([0.5, 0.9, 0.3, 0.5, 0.5])
    z = hard_concrete(log_alpha, u=u)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    torch.testing.assert_close(z, (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1))
    assert z[0] == pytest.approx(0.5)  # u = 1/2, log α = 0: s = 1/2, stretched to 0.5
    assert z[3] == 0.0 and z[4] == 1.0  # clamped at both ends


def test_deterministic_gate_and_expected_l0() -> None:
    log_alpha = torch.tensor([0.0, 5.0, -5.0])
    torch.testing.assert_close(deterministic_gate(log_alpha), torch.tensor([0.5, 1.0, 0.0]))
    shift = BETA * math.log(-GAMMA / ZETA)  # β log(−γ/ζ) = (2/3) log(1/11)
    expected = torch.sigmoid(log_alpha - shift)
    torch.testing.assert_close(expected_l0(log_alpha), expected)
    assert float(expected_l0(torch.tensor(0.0))) == pytest.approx(1 / (1 + math.exp(shift)))


def test_expected_l0_matches_the_sampled_rate_of_open_gates() -> None:
    torch.manual_seed(0)
    for value in (-2.0, 0.0, 1.5):
        samples = hard_concrete(torch.full((200_000,), value))
        assert float((samples > 0).float().mean()) == pytest.approx(
            float(expected_l0(torch.tensor(value))), abs=0.01
        )


# -- the unit and the regularizer channel ----------------------------------------------------


def test_identity_at_init_in_training_mode_too() -> None:
    mm = _model()
    base = modfit.wrap(tiny_bert())
    mm.train()
    with torch.no_grad():
        assert torch.equal(mm.model(**_inputs()).last_hidden_state, base.model(**_inputs()).last_hidden_state)


def test_regularizer_enters_the_loss_in_training_mode_only() -> None:
    mm = _model(l0_lambda=1e-3)
    labels = torch.tensor([0, 1])
    expected = 1e-3 * TINY_ENTRIES * float(expected_l0(torch.tensor(5.0)))
    assert float(mm.regularization().detach()) == pytest.approx(expected, rel=1e-5)
    mm.eval()
    eval_loss = mm(**_inputs(), labels=labels).loss
    mm.train()
    train_loss = mm(**_inputs(), labels=labels).loss  # w = 0: the same logits, plus the penalty
    assert float((train_loss - eval_loss).detach()) == pytest.approx(expected, rel=1e-4)
    train_loss.backward()
    assert all(
        u.gate is not None and u.gate.grad is not None and u.gate.grad.abs().sum() > 0 for u in _units(mm)
    )
    mm.deactivate()
    assert mm.regularization() is None


def test_regularizer_reaches_a_head_less_loss() -> None:
    mm = modfit.wrap(tiny_bert_classifier())
    mm.add("d", modfit.config("diff_pruning", l0_lambda=1e-3))
    mm.activate("d")
    batch = {**_inputs(), "labels": torch.tensor([0, 1])}
    mm.train()
    plain = mm.model(**batch).loss
    with_penalty = _LossModule(mm)(batch).loss
    extra = mm.regularization()
    assert extra is not None
    assert float((with_penalty - plain).detach()) == pytest.approx(float(extra.detach()), rel=1e-4)


def test_gate_lr_scale_reparametrises_log_alpha() -> None:
    mm = _model(gate_lr_scale=50.0, init_log_alpha=3.0)
    unit = _units(mm)[0]
    assert unit.gate is not None
    assert float(unit.gate[0, 0].detach()) == pytest.approx(3.0 / 50.0)
    assert float(unit.log_alpha[0, 0].detach()) == pytest.approx(3.0)


def test_merge_uses_the_deterministic_gate() -> None:
    mm = _model()
    _randomise(mm)
    mm.train()  # even in training mode, the merged delta is z_eval ⊙ w
    unit = _units(mm)[0]
    assert unit.w is not None
    torch.testing.assert_close(
        unit.deltas(torch.nn.Linear(1, 1))["weight"], deterministic_gate(unit.log_alpha) * unit.w
    )


# -- finalize: the sparse form ---------------------------------------------------------------


def test_finalize_keeps_the_open_gates_and_the_outputs(tmp_path: Path) -> None:
    mm = _model()
    _randomise(mm)
    mm.eval()
    with torch.no_grad():
        before = mm(**_inputs()).logits
    opened = sum(int((deterministic_gate(u.log_alpha) > 0).sum()) for u in _units(mm))
    assert 0 < opened < TINY_ENTRIES
    finalize(mm, "d")
    assert mm.trainable_parameters("d") == opened == sum(mm.records["d"].config.sizes)
    assert all(u.gate is None and u.w is None and u.regularizer() is None for u in _units(mm))
    with torch.no_grad():
        torch.testing.assert_close(mm(**_inputs()).logits, before, atol=1e-6, rtol=0)
    mm.save("d", tmp_path / "d")
    assert (tmp_path / "d" / WEIGHTS).stat().st_size < opened * 8 + 10_000  # index + value an entry
    mm2 = modfit.wrap(tiny_bert())
    mm2.load(tmp_path / "d")
    mm2.activate("d")
    with torch.no_grad():
        torch.testing.assert_close(mm2(**_inputs()).logits, before, atol=1e-6, rtol=0)
    assert sparse_diff(mm2, "d").numel == opened
    with pytest.raises(ValueError, match="training form"):
        finalize(mm, "d")


def test_finalize_to_a_target_density_keeps_exactly_that_many() -> None:
    mm = _model()
    _randomise(mm)
    finalize(mm, "d", density=0.01)
    assert mm.trainable_parameters("d") == int(0.01 * TINY_ENTRIES)


def test_training_finalizes_and_learns() -> None:
    mm = _model(l0_lambda=1e-4, gate_lr_scale=10.0)  # gates move slowly: most stay open
    settings = TrainSettings(steps=6, lr=1e-2, batch_size=8, progress=False, log_every=1)
    result = train(mm, "d", seq_cls_features(32), collate_fn=collate_fn, settings=settings)
    assert result.history[0]["loss"] > result.history[-1]["loss"]
    sizes = mm.records["d"].config.sizes
    assert sizes is not None and 0 < sum(sizes) <= TINY_ENTRIES
    assert mm.trainable_parameters("d") == sum(sizes)


def test_the_l0_penalty_closes_gates() -> None:
    """With gates that start half open and move fast, the penalty shuts most of them in a few steps."""
    mm = _model(l0_lambda=1e-2, init_log_alpha=0.0, gate_lr_scale=1000.0)
    settings = TrainSettings(steps=20, lr=1e-3, batch_size=8, progress=False)
    train(mm, "d", seq_cls_features(32), collate_fn=collate_fn, settings=settings)
    assert mm.trainable_parameters("d") < 0.2 * TINY_ENTRIES
