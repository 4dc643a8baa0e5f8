"""The invariants every registered method must keep, on every model family it attaches to.

Parametrised over `modfit.methods()`, so a newly registered method is covered without touching this
file, and over every tiny family of `conftest.FAMILIES`:

(a) a freshly added module is the identity (outputs exactly equal);
(b) with random parameters: active changes the output, inactive gives the base output exactly;
(c) merged equals unmerged for mergeable methods, merge() refuses the others; unmerge restores W;
(d) save, then load onto a fresh copy of the same base: identical outputs;
(e) train_only: only that module's parameters (and its head) get gradients;
(f) removing every module restores the base state dict bit for bit and leaves no hooks;
(g) in inference, folding a unit into its projection's weight for the call (`folding.py`, LoRA and DoRA;
    here at any number of tokens) gives the unit's own outputs, and writes nothing into the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

import modfit
from modfit.archs import arch_for
from modfit.methods import lora
from modfit.model import ModularModel
from modfit.registry import method_entry

if TYPE_CHECKING:
    from conftest import Family

# Methods whose modules stand alone; fusion layers only exist over other modules (tests/test_fusion.py
# checks the same invariants for them).
METHODS = [m for m in modfit.methods() if method_entry(m).standalone]
LABELS = ("neg", "pos")


def _config(method: str, family: Family) -> modfit.ModuleConfig:
    """The method's default config; a family without a table row gets explicit LoRA-style targets."""
    config = modfit.config(method)
    known = arch_for(family.model_type) is not None
    if not known and "targets" in {f.name for f in dataclasses.fields(config)}:
        config = config.replace(targets=family.targets)
    return config


def _add(
    mm: ModularModel, name: str, method: str, family: Family, head: modfit.HeadConfig | None = None
) -> None:
    """Add a module; skip the test only when the method cannot attach to a family the table lacks."""
    try:
        mm.add(name, _config(method, family), head=head)
    except modfit.TargetError as e:
        if arch_for(family.model_type) is not None:
            raise
        pytest.skip(f"{method} cannot attach to {family.model_type}: {e}")


@torch.no_grad()
def _randomise(mm: ModularModel, name: str, seed: int = 1) -> None:
    """Replace the module's unit parameters by N(0, 0.1²) values (the default init is an identity)."""
    g = torch.Generator().manual_seed(seed)
    for p in mm.module_parameters(name, include_head=False):
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)


def _run(family: Family, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return family.run(model)


def _mergeable(mm: ModularModel, name: str) -> bool:
    return all(unit.mergeable for _, unit in mm.units(name))


def _hooks(model: nn.Module) -> list[str]:
    """Every forward hook or pre-hook left on any submodule, as 'path: kind'."""
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    return [
        f"{path or '<root>'}: {kind}"
        for path, m in model.named_modules()
        for kind in kinds
        if getattr(m, kind)
    ]


@pytest.mark.parametrize("method", METHODS)
def test_new_module_is_identity(method: str, family: Family) -> None:
    if not modfit.config(method).identity_at_init:
        pytest.skip(f"{method} changes outputs from the start by design (identity_at_init=False)")
    model = family.build()
    base = _run(family, model)
    mm = modfit.wrap(model)
    _add(mm, "m", method, family)
    mm.activate("m")
    assert torch.equal(_run(family, model), base)


@pytest.mark.parametrize("method", METHODS)
def test_active_changes_inactive_restores(method: str, family: Family) -> None:
    model = family.build()
    base = _run(family, model)
    mm = modfit.wrap(model)
    _add(mm, "m", method, family)
    _add(mm, "other", method, family)
    _randomise(mm, "m")
    mm.activate("m")
    active = _run(family, model)
    assert (active - base).abs().max() > 1e-4, "a module with random parameters left the output unchanged"
    mm.deactivate()
    assert torch.equal(_run(family, model), base)
    mm.activate("other")  # a composition without "m" (and "other" is still the identity)
    if modfit.config(method).identity_at_init:
        assert torch.equal(_run(family, model), base)
    else:  # e.g. virtual tokens: a fresh "other" changes outputs too, but not as "m" does
        assert not torch.equal(_run(family, model), active)
    mm.activate("m")
    assert torch.equal(_run(family, model), active)


@pytest.mark.parametrize("method", METHODS)
def test_merge(method: str, family: Family) -> None:
    model = family.build()
    mm = modfit.wrap(model)
    _add(mm, "m", method, family)
    _randomise(mm, "m")
    mm.activate("m")
    unmerged = _run(family, model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    if not _mergeable(mm, "m"):
        with pytest.raises(ValueError, match="cannot be merged"):
            mm.merge("m")
        assert not mm.records["m"].merged
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        assert torch.equal(_run(family, model), unmerged)
        return
    mm.merge("m")
    assert mm.records["m"].merged
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert changed, "merge changed no weight"
    torch.testing.assert_close(_run(family, model), unmerged, atol=1e-5, rtol=0)
    mm.unmerge("m")
    assert not mm.records["m"].merged
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(_run(family, model), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_folded_equals_unfolded(method: str, family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora, "FOLD_TOKENS", 0)  # LoRA folds whatever the number of tokens
    model = family.build()
    mm = modfit.wrap(model)
    _add(mm, "m", method, family)
    _randomise(mm, "m")
    mm.activate("m")
    mm.fold_per_call = False
    unfolded = _run(family, model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    mm.fold_per_call = True
    torch.testing.assert_close(_run(family, model), unfolded, atol=1e-5, rtol=0)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", METHODS)
def test_save_load_identical(method: str, family: Family, tmp_path: Path) -> None:
    model = family.build()
    mm = modfit.wrap(model)
    _add(mm, "m", method, family, head=modfit.head("seq-cls", LABELS))
    _randomise(mm, "m")
    mm.activate("m")
    expected = _run(family, model)
    with torch.no_grad():
        expected_logits = mm(**family.encoder_inputs()).logits
    mm.save("m", tmp_path / "m")

    fresh = family.build()
    mm2 = modfit.wrap(fresh)
    assert mm2.load(tmp_path / "m") == "m"
    mm2.activate("m")
    assert torch.equal(_run(family, fresh), expected)
    with torch.no_grad():
        assert torch.equal(mm2(**family.encoder_inputs()).logits, expected_logits)
    saved = dict(mm.model.modfit.state_dict())
    loaded = dict(mm2.model.modfit.state_dict())
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


@pytest.mark.parametrize("method", METHODS)
def test_train_only_gradients(method: str, family: Family) -> None:
    model = family.build()
    mm = modfit.wrap(model)
    _add(mm, "other", method, family, head=modfit.head("seq-cls", LABELS))
    _add(mm, "m", method, family, head=modfit.head("seq-cls", LABELS))
    _randomise(mm, "other", seed=2)
    _randomise(mm, "m", seed=3)
    mm.activate("stack(other, m)", head="m")  # "other" runs too, but must not train
    trainable = mm.train_only("m")
    assert str(mm.active) == "stack(other, m)"
    mine = {id(p) for p in mm.module_parameters("m")}
    assert {id(p) for p in trainable} == mine
    assert mine, "the module has no parameters"

    loss = family.run(model).float().pow(2).mean()
    loss = loss + mm(**family.encoder_inputs(), labels=torch.tensor([0, 1])).loss
    loss.backward()

    for path, p in model.named_parameters():
        if id(p) in mine:
            assert p.requires_grad, path
            assert p.grad is not None, f"{path}: no gradient"
            assert torch.isfinite(p.grad).all(), path
        else:
            assert not p.requires_grad, f"{path}: still trainable"
            assert p.grad is None, f"{path}: got a gradient"


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_base(method: str, family: Family) -> None:
    model = family.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert _hooks(model) == []
    base = _run(family, model)

    mm = modfit.wrap(model)
    _add(mm, "a", method, family)
    _add(mm, "b", method, family, head=modfit.head("seq-cls", LABELS))
    _randomise(mm, "a")
    _randomise(mm, "b", seed=2)
    mm.activate("stack(a, b)")
    mm.train_only("b")
    assert not torch.equal(_run(family, model), base)
    mm.remove("a")
    mm.remove("b")

    assert mm.module_names == []
    assert mm.active is None
    assert not hasattr(model, "modfit")
    after = model.state_dict()
    assert list(after) == list(before)
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed == []
    assert _hooks(model) == []
    assert torch.equal(_run(family, model), base)
