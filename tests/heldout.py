"""Held-out learning for any method: the packaged MiniLM, the project's demo sentiment data.

`held_out_accuracy(method, params, lr=..., steps=...)` adds a module of `method` with a seq-cls
head to a fresh MiniLM, trains it with modfit's own loop on a fixed subset of
`demo_data/sentiment_train.csv`, and returns accuracy on a fixed subset of
`demo_data/sentiment_test.csv` (templates and words partly unseen in training). Chance is 50%.

Every method's learning test calls this with its own learning rate and step count and asserts a
threshold measured with margin, so all methods are judged on the same data and budget.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

import modfit
from modfit.base import load_base, load_tokenizer
from modfit.batching import collate, encode
from modfit.data import label_list, read_examples
from modfit.demo import demo_data_path
from modfit.train import TrainSettings, evaluate, train

TRAIN_EXAMPLES, TEST_EXAMPLES, MAX_LENGTH, BATCH = 384, 200, 48, 16


@functools.lru_cache(maxsize=1)
def _data() -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]], tuple[str, ...]]:
    tokenizer = load_tokenizer("default")
    train_examples = read_examples(demo_data_path("sentiment_train.csv"), "seq-cls")
    test_examples = read_examples(demo_data_path("sentiment_test.csv"), "seq-cls")
    labels = tuple(label_list(train_examples))
    # Fixed, label-balanced subsets: the files alternate labels in blocks, so take every n-th row.
    train_subset = train_examples[:: len(train_examples) // TRAIN_EXAMPLES][:TRAIN_EXAMPLES]
    test_subset = test_examples[:: len(test_examples) // TEST_EXAMPLES][:TEST_EXAMPLES]
    features = encode(train_subset, tokenizer, "seq-cls", labels=labels, max_length=MAX_LENGTH)
    test_features = encode(test_subset, tokenizer, "seq-cls", labels=labels, max_length=MAX_LENGTH)
    return tokenizer, features, test_features, labels


def held_out_accuracy(
    method: str,
    params: dict[str, Any] | None = None,
    *,
    lr: float,
    steps: int = 48,
    seed: int = 0,
) -> float:
    """Train a `method` module (and its seq-cls head) briefly on MiniLM; held-out accuracy.

    Args:
        method: a registered method; params: its config fields.
        lr: peak learning rate; steps: optimizer steps of batch 16 (48 steps = 2 passes over 384).

    Measured (one thread, seed 0, 48 steps): lora r=8 alpha=16 at lr 2e-3: 0.86; pfeiffer at
    lr 2e-3: 0.855. About 20 s per call.
    """
    tokenizer, features, test_features, labels = _data()
    torch.manual_seed(seed)
    mm = modfit.wrap(load_base("default"))
    mm.add(method, modfit.config(method, **(params or {})), head=modfit.head("seq-cls", labels))
    mm.activate(method)

    def collate_fn(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(batch, tokenizer.pad_token_id)

    settings = TrainSettings(
        steps=steps, lr=lr, batch_size=BATCH, seed=seed, warmup_ratio=0.1, progress=False
    )
    train(mm, method, features, collate_fn=collate_fn, settings=settings)
    return evaluate(mm, test_features, collate_fn=collate_fn, batch_size=64)["accuracy"]


@functools.lru_cache(maxsize=4)
def demo_split(task: str) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]], tuple[str, ...]]:
    """`_data()` for any seq-cls file pair of the demo data: `demo_data/{task}_train.csv` and
    `{task}_test.csv` (e.g. "sentiment", "topic"), the same fixed label-balanced subsets and lengths.

    Returns:
        (tokenizer, train features, test features, labels).
    """
    tokenizer = load_tokenizer("default")
    train_examples = read_examples(demo_data_path(f"{task}_train.csv"), "seq-cls")
    test_examples = read_examples(demo_data_path(f"{task}_test.csv"), "seq-cls")
    labels = tuple(label_list(train_examples))
    train_subset = train_examples[:: max(len(train_examples) // TRAIN_EXAMPLES, 1)][:TRAIN_EXAMPLES]
    test_subset = test_examples[:: max(len(test_examples) // TEST_EXAMPLES, 1)][:TEST_EXAMPLES]
    features = encode(train_subset, tokenizer, "seq-cls", labels=labels, max_length=MAX_LENGTH)
    test_features = encode(test_subset, tokenizer, "seq-cls", labels=labels, max_length=MAX_LENGTH)
    return tokenizer, features, test_features, labels


def train_and_score(
    mm: modfit.ModularModel,
    name: str,
    task: str,
    *,
    lr: float,
    steps: int = 48,
    seed: int = 0,
) -> float:
    """Train module `name` (already on `mm`, with its head, in the active composition) on the demo
    `task` split as `held_out_accuracy` does; its held-out accuracy with the same composition."""
    tokenizer, features, test_features, _labels = demo_split(task)

    def collate_fn(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(batch, tokenizer.pad_token_id)

    torch.manual_seed(seed)
    settings = TrainSettings(
        steps=steps, lr=lr, batch_size=BATCH, seed=seed, warmup_ratio=0.1, progress=False
    )
    train(mm, name, features, collate_fn=collate_fn, settings=settings)
    return evaluate(mm, test_features, collate_fn=collate_fn, batch_size=64)["accuracy"]
