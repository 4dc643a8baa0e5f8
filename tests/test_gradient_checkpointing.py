"""Activation checkpointing (`mm.gradient_checkpointing_enable()`, `TrainSettings.gradient_checkpointing`):
the same loss and gradients as without it, routed modules included (the recomputation in backward runs
under the call's route), and the layers really are recomputed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch

import modfit
from modfit.model import ModularModel

if TYPE_CHECKING:
    from conftest import Family

LABELS = ("no", "yes")


def _model(family: Family) -> ModularModel:
    torch.manual_seed(0)
    mm = modfit.wrap(family.build())
    mm.add("lora", modfit.config("lora", r=2, targets=family.targets), head=modfit.head("seq-cls", LABELS))
    mm.add("poly", modfit.config("poly", tasks=("a", "b"), n_skills=3, r=2, targets=family.targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("lora", "poly"):
            for p in mm.module_parameters(name, include_head=False):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    mm.activate("stack(poly, lora)")
    for p in mm.model.parameters():
        p.requires_grad_(False)
    for name in ("lora", "poly"):
        for p in mm.module_parameters(name):
            p.requires_grad_(True)
    mm.model.train()
    return mm


def _step(mm: ModularModel, family: Family) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(7)  # dropout masks and the Gumbel-sigmoid sample
    out = mm(**family.encoder_inputs(), task_ids=torch.tensor([1, 0]), labels=torch.tensor([0, 1]))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in mm.model.named_parameters() if p.grad is not None}
    mm.model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_checkpointed_step_equals_the_plain_one(tiny: Callable[[str], Family], name: str) -> None:
    family = tiny(name)
    mm = _model(family)
    loss, grads = _step(mm, family)
    calls = []
    unit = next(u for _, u in mm.units("lora"))
    handle = unit.register_forward_hook(lambda *a: calls.append(1))
    _step(mm, family)
    plain_calls = len(calls)
    mm.gradient_checkpointing_enable()
    assert mm.is_gradient_checkpointing
    calls.clear()
    loss_ckpt, grads_ckpt = _step(mm, family)
    assert len(calls) == 2 * plain_calls  # the layer ran again during backward
    handle.remove()
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and len(grads) > 0
    for key, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[key], grad, atol=1e-6, rtol=1e-5, msg=key)
    mm.gradient_checkpointing_disable()
    assert not mm.is_gradient_checkpointing


def test_train_loop_option_restores_the_setting(tiny: Callable[[str], Family]) -> None:
    from modfit.train import TrainSettings, train

    family = tiny("bert")
    mm = modfit.wrap(family.build())
    mm.add("lora", modfit.config("lora", r=2, targets=family.targets), head=modfit.head("seq-cls", LABELS))
    ids = family.encoder_inputs()
    features = [
        {"input_ids": ids["input_ids"][i], "attention_mask": ids["attention_mask"][i], "labels": i % 2}
        for i in range(2)
    ]
    seen = []

    def collate(batch: list[dict[str, object]]) -> dict[str, torch.Tensor]:
        seen.append(mm.is_gradient_checkpointing)
        return {k: torch.stack([torch.as_tensor(f[k]) for f in batch]) for k in batch[0]}

    settings = TrainSettings(steps=2, batch_size=2, progress=False, gradient_checkpointing=True)
    train(mm, "lora", features, collate_fn=collate, settings=settings)
    assert seen and all(seen)
    assert not mm.is_gradient_checkpointing


def test_unsupported_base_is_named(tiny: Callable[[str], Family]) -> None:
    mm = modfit.wrap(tiny("bert").build())
    mm.model.supports_gradient_checkpointing = False  # as for a model class without it
    with pytest.raises(ValueError, match="BertModel does not support gradient checkpointing"):
        mm.gradient_checkpointing_enable()
