"""The HuggingFace `Trainer` trains modfit modules without special cases.

Two ways in: `Trainer(model=mm)` uses the module's own head (head mode, `ModularOutput.loss`), and
`Trainer(model=mm.model)` trains a task model from transformers with a modfit module inside it
(its classifier unfrozen by hand). In both, only the intended parameters move.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import modfit
from modfit.model import ModularModel
from modfit.train import evaluate
from train_fixtures import collate_fn, seq_cls_features, seq_cls_model, tiny_bert_classifier

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")


def _args(tmp_path: Any, **overrides: Any) -> Any:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "hf"),
        max_steps=20,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        warmup_steps=0,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=5,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_trainer_trains_module_in_head_mode(tmp_path: Any) -> None:
    mm = seq_cls_model()
    mm.train_only("task")
    train, dev = seq_cls_features(48), seq_cls_features(16, seed=1)
    before_loss = evaluate(mm, dev, collate_fn=collate_fn)["loss"]
    before = _snapshot(mm)
    module_ids = {id(p) for p in mm.module_parameters("task")}

    trainer = transformers.Trainer(
        model=mm, args=_args(tmp_path), train_dataset=train, data_collator=collate_fn
    )
    trainer.train()

    after = dict(mm.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in after.items() if id(p) in module_ids}  # every module param moved
    for n, p in after.items():
        if id(p) not in module_ids:
            assert torch.equal(p, before[n]), f"base parameter {n} changed"
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    assert evaluate(mm, dev, collate_fn=collate_fn)["loss"] < before_loss


def test_trainer_with_activation_checkpointing(tmp_path: Any) -> None:
    """The Trainer's checkpointing switch (`activation_checkpointing` in transformers 5,
    `gradient_checkpointing` before) reaches the base model through `mm`, and training still works."""
    mm = seq_cls_model()
    mm.train_only("task")
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    switch = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = _args(tmp_path, max_steps=4, **{switch: True})
    seen = []

    def collate(features: Any) -> Any:
        seen.append(mm.is_gradient_checkpointing)
        return collate_fn(features)

    trainer = transformers.Trainer(
        model=mm, args=args, train_dataset=seq_cls_features(32), data_collator=collate
    )
    trainer.train()
    assert seen and all(seen)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_trainer_trains_hf_task_model_with_module_inside(tmp_path: Any) -> None:
    model = tiny_bert_classifier()
    mm = modfit.wrap(model)
    torch.manual_seed(1)
    mm.add("task", modfit.config("lora", r=4, alpha=8.0))  # no modfit head: the HF classifier is the head
    mm.train_only("task")
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    trainable = {id(p) for p in mm.module_parameters("task")} | {id(p) for p in model.classifier.parameters()}
    before = _snapshot(model)

    train = seq_cls_features(48)
    batch = collate_fn(train)
    with torch.no_grad():
        before_loss = float(model(**batch).loss)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=train, data_collator=collate_fn
    )
    trainer.train()

    for n, p in model.named_parameters():
        if id(p) in trainable:
            assert not torch.equal(p, before[n]), f"trainable parameter {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    model.eval()
    with torch.no_grad():
        assert float(model(**batch).loss) < before_loss
    # The trained module saves and reloads like any other.
    mm.save("task", tmp_path / "task")
    assert modfit.read_card(tmp_path / "task")["method"] == "lora"


def _train_with_accum(tmp_path: Any, batch: int, accum: int) -> dict[str, torch.Tensor]:
    mm = seq_cls_model()
    mm.train_only("task")
    args = _args(
        tmp_path / f"b{batch}a{accum}",
        max_steps=4,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        optim="sgd",  # SGD shows a wrongly scaled loss (Adam would hide it)
        max_grad_norm=0.0,
        learning_rate=0.5,
    )
    transformers.Trainer(
        model=mm, args=args, train_dataset=seq_cls_features(32), data_collator=collate_fn
    ).train()
    return {str(i): p.detach().clone() for i, p in enumerate(mm.module_parameters("task"))}


def test_trainer_gradient_accumulation_matches_full_batch(tmp_path: Any) -> None:
    full = _train_with_accum(tmp_path, batch=8, accum=1)
    accumulated = _train_with_accum(tmp_path, batch=4, accum=2)
    assert max(float((full[k] - accumulated[k]).abs().max()) for k in full) < 1e-5


def test_trainer_gradient_accumulation_with_loss_kwargs_off(tmp_path: Any, monkeypatch: Any) -> None:
    # The suggested core fix, applied here: the Trainer then scales the loss itself.
    monkeypatch.setattr(ModularModel, "accepts_loss_kwargs", False, raising=False)
    full = _train_with_accum(tmp_path, batch=8, accum=1)
    accumulated = _train_with_accum(tmp_path, batch=4, accum=2)
    assert max(float((full[k] - accumulated[k]).abs().max()) for k in full) < 1e-5


def test_trainer_keeps_token_type_ids(tmp_path: Any) -> None:
    mm = seq_cls_model()
    mm.train_only("task")
    features = [dict(f, token_type_ids=[1] * len(f["input_ids"])) for f in seq_cls_features(16)]
    seen: list[list[str]] = []
    mm.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True
    )
    args = _args(tmp_path, max_steps=1)
    transformers.Trainer(model=mm, args=args, train_dataset=features, data_collator=collate_fn).train()
    assert "token_type_ids" in seen[0]
