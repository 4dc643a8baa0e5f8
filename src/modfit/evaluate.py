"""Scoring and predicting with the active head, one batch of features at a time.

    evaluate(mm, dev, collate_fn=..., batch_size=64)     # {"accuracy", "macro_f1", "loss"}
    predict(mm, test, collate_fn=..., batch_size=64)     # label names, or one tag list per sentence

Losses average over every prediction (example or token), not over batches: a batch's mean loss
counts `count_targets` times, the same weighting the training loop uses for its micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .batching import IGNORE_INDEX, decode_token_predictions
from .metrics import accuracy, entity_scores, macro_f1, perplexity
from .model import ModularModel

__all__ = ["count_targets", "evaluate", "predict", "to_device"]

Feature = Mapping[str, Any]
CollateFn = Callable[[list[Any]], Mapping[str, Any]]


def count_targets(task: str | None, labels: torch.Tensor) -> int:
    """Predictions the head's loss averages over: non-ignored labels (causal LM: all but the first)."""
    if task == "causal-lm":
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`; other entries (word_ids lists, ...) are not model inputs."""
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _chunks(features: Sequence[Feature], size: int) -> Iterator[list[Feature]]:
    for start in range(0, len(features), size):
        yield list(features[start : start + size])


def _task_and_labels(mm: ModularModel) -> tuple[str | None, tuple[str, ...]]:
    if mm.head_name is None:
        return None, ()
    head = mm.records[mm.head_name].head
    assert head is not None
    return head.task, head.labels


@torch.no_grad()
def evaluate(
    mm: ModularModel, features: Sequence[Feature], *, collate_fn: CollateFn, batch_size: int = 32
) -> dict[str, float]:
    """Score the active head on labelled features.

    seq-cls: accuracy, macro_f1, loss. token-cls: entity precision/recall/f1 (seqeval, IOB2,
    default mode) over word-level tags (a word's tag sits on its first sub-token, the positions
    whose label is not -100), plus accuracy over those positions and loss. mlm / causal-lm: loss
    and perplexity. Without an active head: the HF model's own loss. Losses average over every
    prediction (example or token), not over batches.

    Args:
        mm: the model; it runs in eval mode and is put back in the mode it had.
        features: encoded examples with labels.
        collate_fn: features -> batch (as for training).
        batch_size: examples per forward pass.

    Returns:
        Metric name -> value.

    Raises:
        ValueError: no features, or a batch without labels.
    """
    if not features:
        raise ValueError("no features to evaluate")
    task, label_names = _task_and_labels(mm)
    device = next(mm.parameters()).device
    was_training = mm.model.training
    mm.eval()
    loss_sum, count = 0.0, 0
    predicted: list[Any] = []
    gold: list[Any] = []
    try:
        for chunk in _chunks(features, batch_size):
            batch = to_device(collate_fn(chunk), device)
            labels = batch.get("labels")
            if labels is None:
                raise ValueError("evaluate needs labelled features (the collated batch has no 'labels')")
            out = mm(**batch) if task is not None else mm.model(**batch)
            if getattr(out, "loss", None) is None:
                raise ValueError(
                    "no active module has a head and the model computed no loss: activate a module "
                    "with a head (mm.activate(name)) or use a model with its own task head"
                )
            n = count_targets(task, labels)
            loss_sum += out.loss.item() * n if n else 0.0
            count += n
            if task in ("seq-cls", "token-cls"):
                ids = out.logits.argmax(-1).cpu()  # (B,) or (B, L)
                for pred_row, gold_row in zip(ids, labels.cpu(), strict=True):
                    keep = gold_row != IGNORE_INDEX  # first sub-token of each word; one label per sequence
                    predicted.append([label_names[i] for i in pred_row[keep].tolist()])
                    gold.append([label_names[i] for i in gold_row[keep].tolist()])
    finally:
        mm.train(was_training)
    loss = loss_sum / count if count else math.nan
    if task == "seq-cls":
        p, g = [row[0] for row in predicted if row], [row[0] for row in gold if row]
        return {"accuracy": accuracy(p, g), "macro_f1": macro_f1(p, g), "loss": loss}
    if task == "token-cls":
        flat_p, flat_g = [t for row in predicted for t in row], [t for row in gold for t in row]
        return {**entity_scores(predicted, gold), "accuracy": accuracy(flat_p, flat_g), "loss": loss}
    if task in ("mlm", "causal-lm"):
        return {"loss": loss, "perplexity": perplexity(loss)}
    return {"loss": loss}


@torch.no_grad()
def predict(
    mm: ModularModel, features: Sequence[Feature], *, collate_fn: CollateFn, batch_size: int = 32
) -> list[Any]:
    """Predict with the active classification head.

    Args:
        mm: the model; it runs in eval mode and is put back in the mode it had.
        features: encoded examples (labels not needed). token-cls features need `word_ids`
            (as `batching.encode` makes them) or labels marking each word's first sub-token.
        collate_fn: features -> batch.
        batch_size: examples per forward pass.

    Returns:
        seq-cls: one label name per feature. token-cls: one tag list per feature, one tag per
        word (words cut off by truncation are not included).

    Raises:
        ValueError: no active head, or a head that is not seq-cls / token-cls.
    """
    task, label_names = _task_and_labels(mm)
    if task not in ("seq-cls", "token-cls"):
        raise ValueError(f"predict needs an active seq-cls or token-cls head, not {task or 'none'}")
    device = next(mm.parameters()).device
    was_training = mm.model.training
    mm.eval()
    results: list[Any] = []
    try:
        for chunk in _chunks(features, batch_size):
            batch = to_device(collate_fn(chunk), device)
            batch.pop("labels", None)
            ids = mm(**batch).logits.argmax(-1).cpu()  # (B,) or (B, L)
            for feature, row in zip(chunk, ids, strict=True):
                if task == "seq-cls":
                    results.append(label_names[int(row)])
                elif "word_ids" in feature:
                    results.append(decode_token_predictions(row, feature["word_ids"], label_names))
                elif "labels" in feature:
                    keep = torch.as_tensor(feature["labels"]) != IGNORE_INDEX
                    results.append([label_names[i] for i in row[: len(keep)][keep].tolist()])
                else:
                    raise ValueError("token-cls prediction needs word_ids (or labels) on each feature")
    finally:
        mm.train(was_training)
    return results
