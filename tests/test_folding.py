"""Folding a unit into one inference call's weight (`folding.py`): the same outputs as the unit's own
forward, only where it is safe and cheaper, nothing written into the model, no offer outliving its call."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

import modfit
from modfit import cpu_kernels, folding
from modfit.methods.lora import LoraUnit
from modfit.sites import Site, Unit

if TYPE_CHECKING:
    from conftest import Family

# tiny models are 32 wide: LoRA folds from 2·32·32/64 = 32 tokens; BATCH x SEQ gives 14, these 48
MANY = (4, 12)


def _inputs(shape: tuple[int, int] = MANY, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, shape, generator=g)
    mask = torch.ones(shape, dtype=torch.long)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class Folds:
    """Counts the offers sites make and the products that take them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offered = self.taken = 0
        offer, route = folding.offer, folding.route

        def counting_offer(weight: torch.Tensor, folded: torch.Tensor) -> None:
            self.offered += 1
            offer(weight, folded)

        def counting_route(call: dict[str, Any], inner: Any) -> torch.Tensor | None:
            pending = folding._slot.folded is not None and call.get("weight") is folding._slot.weight
            out = route(call, inner)
            self.taken += pending
            return out

        monkeypatch.setattr(folding, "offer", counting_offer)
        monkeypatch.setattr(folding, "route", counting_route)


@pytest.fixture
def folds(monkeypatch: pytest.MonkeyPatch) -> Folds:
    return Folds(monkeypatch)


def _model(
    tiny: Callable[[str], Family], method: str = "lora", names: tuple[str, ...] = ("a",), **options: Any
) -> modfit.ModularModel:
    mm = modfit.wrap(tiny("bert").build())  # eval mode
    for name in names:
        mm.add(name, modfit.config(method, **options))
        with torch.no_grad():
            for p in mm.module_parameters(name):
                p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)  # DoRA's magnitude stays > 0
    return mm


def _both(mm: modfit.ModularModel, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(folded, unfolded) outputs of one no-grad forward each."""
    with torch.no_grad():
        mm.fold_per_call = True
        folded = mm.model(**inputs)[0]
        mm.fold_per_call = False
        unfolded = mm.model(**inputs)[0]
    mm.fold_per_call = True
    return folded, unfolded


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_lora_folds_on_many_tokens_with_the_same_outputs(
    tiny: Callable[[str], Family], folds: Folds, mode: str
) -> None:
    mm = _model(tiny)
    mm.activate("a")
    with torch.no_grad():
        expected = mm.model(**_inputs())[0]  # fold_per_call is on by default
    assert folds.offered == folds.taken == 4  # 2 layers x (query, value)
    mm.fold_per_call = False
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        unfolded = mm.model(**_inputs())[0]
    assert folds.offered == 4
    torch.testing.assert_close(expected, unfolded, atol=1e-5, rtol=0)
    mm.deactivate()
    with torch.no_grad():
        base = mm.model(**_inputs())[0]
    assert (expected - base).abs().max() > 1e-2  # the module does change the output


def test_the_model_weights_are_not_touched(tiny: Callable[[str], Family], folds: Folds) -> None:
    mm = _model(tiny)
    before = {k: v.clone() for k, v in mm.model.state_dict().items()}
    mm.activate("a")
    with torch.no_grad():
        mm.model(**_inputs())
    assert folds.taken == 4
    for key, value in mm.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_few_tokens_run_the_branch(tiny: Callable[[str], Family], folds: Folds) -> None:
    mm = _model(tiny)
    mm.activate("a")
    folded, unfolded = _both(mm, **_inputs((2, 15)))  # 30 tokens < 32
    assert folds.offered == 0
    assert torch.equal(folded, unfolded)


def test_no_fold_while_gradients_are_recorded_or_the_model_trains(
    tiny: Callable[[str], Family], folds: Folds
) -> None:
    mm = _model(tiny)
    mm.activate("a")
    out = mm.model(**_inputs())[0]  # eval, gradients recorded
    assert out.requires_grad and folds.offered == 0
    mm.train()
    with torch.no_grad():
        mm.model(**_inputs())
    assert folds.offered == 0


def test_switch_off_runs_the_branch(tiny: Callable[[str], Family], folds: Folds) -> None:
    mm = _model(tiny)
    mm.activate("a")
    assert mm.fold_per_call  # on by default
    mm.fold_per_call = False
    with torch.no_grad():
        mm.model(**_inputs())
    assert folds.offered == 0


def test_folds_with_torch_products_too(tiny: Callable[[str], Family], folds: Folds) -> None:
    mm = _model(tiny)
    mm.activate("a")
    mm.fast_linear = False
    folded, unfolded = _both(mm, **_inputs())
    assert folds.taken == 4
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=0)


def test_a_projection_with_another_hook_is_not_folded(tiny: Callable[[str], Family], folds: Folds) -> None:
    mm = _model(tiny)
    mm.activate("a")
    seen: list[torch.Tensor] = []
    query = mm.model.get_submodule("encoder.layer.0.attention.self.query")
    query.register_forward_hook(lambda module, args, output: seen.append(output.clone()))
    folded, unfolded = _both(mm, **_inputs())
    assert folds.taken == 3  # every site but that query
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[0], seen[1], atol=0, rtol=0)  # the hook saw the base output both times


def test_units_that_do_not_run_alone_are_not_folded(tiny: Callable[[str], Family], folds: Folds) -> None:
    mm = _model(tiny, names=("a", "b"))
    mm.activate("stack(a, b)")
    folded, unfolded = _both(mm, **_inputs())
    assert folds.offered == 0
    torch.testing.assert_close(folded, unfolded, atol=0, rtol=0)


def test_dora_folds_at_any_number_of_tokens(tiny: Callable[[str], Family], folds: Folds) -> None:
    mm = _model(tiny, "dora")
    mm.activate("a")
    for shape in ((2, 3), MANY):
        folded, unfolded = _both(mm, **_inputs(shape))
        torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=0)
    assert folds.taken == 8


def test_gated_lora_does_not_fold(tiny: Callable[[str], Family], folds: Folds) -> None:
    mm = _model(tiny, use_gating=True)
    mm.activate("a")
    folded, unfolded = _both(mm, **_inputs())
    assert folds.offered == 0
    assert torch.equal(folded, unfolded)


@pytest.mark.parametrize("weight_dtype", [torch.float64, torch.bfloat16])
def test_no_fold_into_a_weight_of_another_dtype(weight_dtype: torch.dtype) -> None:
    unit = LoraUnit(32, 32, r=2, alpha=4).eval()
    base = nn.Linear(32, 32).to(weight_dtype)
    assert unit.folded_weight(base, torch.randn(64, 32, dtype=weight_dtype)) is None
    assert unit.folded_weight(nn.Linear(32, 32), torch.randn(64, 32)) is not None


def test_lora_folded_weight_is_w_plus_scaled_ba() -> None:
    unit = LoraUnit(32, 16, r=2, alpha=6).eval()
    nn.init.normal_(unit.lora_B)
    base = nn.Linear(32, 16)
    assert unit.folded_weight(base, torch.randn(21, 32)) is None  # 2·32·16/48 = 21.3 tokens
    folded = unit.folded_weight(base, torch.randn(22, 32))
    assert folded is not None
    torch.testing.assert_close(folded, base.weight + 3.0 * unit.lora_B @ unit.lora_A)


def test_an_offer_left_by_a_forward_that_raised_is_dropped(
    tiny: Callable[[str], Family], folds: Folds
) -> None:
    mm = _model(tiny)
    mm.activate("a")
    query = mm.model.get_submodule("encoder.layer.0.attention.self.query")

    def fail(module: nn.Module, args: Any) -> None:
        raise RuntimeError("boom")

    handle = query.register_forward_pre_hook(fail)  # after the site's: the offer is made, then this raises
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        mm.model(**_inputs())
    assert folds.offered == 1 and folds.taken == 0
    assert folding._slot.folded is None and folding._slot.weight is None  # dropped when the mode exited
    handle.remove()
    folded, unfolded = _both(mm, **_inputs())
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=0)


def test_threads_fold_their_own_calls(tiny: Callable[[str], Family]) -> None:
    mm = _model(tiny)
    mm.activate("a")
    inputs = [_inputs(seed=seed) for seed in range(4)]
    with torch.no_grad():
        mm.fold_per_call = False
        expected = [mm.model(**x)[0] for x in inputs]
        mm.fold_per_call = True
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                results[i].append(mm.model(**inputs[i])[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert len(results[i]) == 5
        for out in results[i]:
            torch.testing.assert_close(out, expected[i], atol=1e-5, rtol=0)


def test_a_unit_declining_to_fold_runs_its_forward(
    tiny: Callable[[str], Family], folds: Folds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit with `folds_per_call` whose `folded_weight` declines (the base class's) runs as usual."""
    monkeypatch.setattr(LoraUnit, "folded_weight", Unit.folded_weight)
    mm = _model(tiny)
    mm.activate("a")
    folded, unfolded = _both(mm, **_inputs())
    assert folds.offered == 0
    assert torch.equal(folded, unfolded)


def test_the_mode_is_entered_for_folding_only_where_a_site_may_fold(tiny: Callable[[str], Family]) -> None:
    """With modfit's products off, an eval forward runs under modfit's mode only while some active unit
    can fold (the mode sees every torch call: a model with nothing to fold keeps torch's path)."""
    mm = _model(tiny)
    mm.fast_linear = False
    seen: list[bool] = []
    layer = mm.model.get_submodule("encoder.layer.0")
    layer.register_forward_pre_hook(lambda module, args: seen.append(cpu_kernels.folding_on()))
    modes = cpu_kernels._local.__dict__
    layer.register_forward_pre_hook(lambda module, args: seen.append(modes["modes"][-1] is not None))
    with torch.no_grad():
        mm.activate("a")
        mm.model(**_inputs())
        mm.deactivate()
        mm.model(**_inputs())
        mm.activate("a")
        mm.fold_per_call = False
        mm.model(**_inputs())
    assert seen == [True, True, False, False, False, False]


def test_removing_the_folding_unit_from_its_site_stops_folding() -> None:
    site = Site("q", nn.Linear(8, 8))
    site.add_unit("a", LoraUnit(8, 8, r=2, alpha=2))
    site.add_unit("b", LoraUnit(8, 8, r=2, alpha=2))
    site.set_active(["a"])
    assert site.folds
    site.remove_unit("a")
    assert not site.folds
    site.set_active(["b"])
    assert site.folds  # b alone
    site.set_active([])
    assert not site.folds
