"""Modules actually learn: LoRA and a Pfeiffer adapter on the packaged pretrained MiniLM, a tiny
sentiment task built from templates (with negation: "not great" is negative), a seq-cls head and a
plain PyTorch loop (AdamW, 32 steps of batch 16, max_length 32).

Two settings per method:
- module and head trained together (`mm.train_only(name)`'s parameters), as a user would;
- the head frozen at its random init, only the module's units trained. MiniLM's pooled features
  are good enough for a trained head alone to fit 64 sentences, so this is what shows that the
  module itself learns.

Measured on one CPU thread: with the head, the loss falls from ~0.68 to ~0.001 (lora and pfeiffer)
and train accuracy is 1.0; with the head frozen, from ~0.67 to ~0.04 (lora) / ~0.01 (pfeiffer),
accuracy 1.0. The asserts leave a wide margin. About 7 s per run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import modfit

POSITIVE = ("great", "wonderful", "excellent", "delightful", "brilliant", "lovely", "fantastic", "superb")
NEGATIVE = ("terrible", "awful", "boring", "dreadful", "horrible", "dull", "poor", "disappointing")
SUBJECTS = (
    "the movie",
    "this film",
    "the acting",
    "the story",
    "the ending",
    "the music",
    "this show",
    "the book",
)
TEMPLATES = ("{s} was {a}.", "i thought {s} was {a}.", "honestly, {s} is {a}", "{s} felt {a} to me")
STEPS, BATCH, MAX_LENGTH = 32, 16, 32


def sentiment_data() -> tuple[list[str], torch.Tensor]:
    """64 short sentences, half labelled positive (1); every other pair is negated ("not great": 0)."""
    texts, labels = [], []
    for i in range(32):
        negate = (i // 2) % 2 == 1
        for label, adjectives in ((1, POSITIVE), (0, NEGATIVE)):
            words = ("not " if negate else "") + adjectives[i % len(adjectives)]
            subject = SUBJECTS[(3 * i + label) % len(SUBJECTS)]
            texts.append(TEMPLATES[i % len(TEMPLATES)].format(s=subject, a=words))
            labels.append(label ^ int(negate))
    return texts, torch.tensor(labels)


def train(
    mm: modfit.ModularModel,
    params: list[nn.Parameter],
    batch: dict[str, Any],
    labels: torch.Tensor,
    lr: float,
) -> list[float]:
    """A plain loop: AdamW over `params`, reshuffling the 64 examples every epoch. Returns the losses."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(params, lr=lr)
    mm.train()
    losses = []
    n = labels.shape[0]
    order = torch.randperm(n)
    for step in range(STEPS):
        start = (step * BATCH) % n
        if start == 0:
            order = torch.randperm(n)
        idx = order[start : start + BATCH]
        out = mm(
            input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx], labels=labels[idx]
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    mm.eval()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("train_head", [True, False], ids=["with-head", "frozen-head"])
@pytest.mark.parametrize("method", ["lora", "pfeiffer"])
def test_module_learns_sentiment(
    method: str, train_head: bool, minilm: nn.Module, minilm_tokenizer: Any
) -> None:
    texts, labels = sentiment_data()
    batch = minilm_tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    torch.manual_seed(0)
    mm = modfit.wrap(minilm)
    mm.add("sentiment", modfit.config(method), head=modfit.head("seq-cls", ["negative", "positive"]))
    base = {k: v.clone() for k, v in minilm.state_dict().items() if not k.startswith("modfit.")}
    head = mm.head_module("sentiment")
    assert head is not None
    head_before = [p.detach().clone() for p in head.parameters()]

    params = mm.train_only("sentiment")
    if not train_head:
        for p in head.parameters():
            p.requires_grad_(False)
        params = mm.module_parameters("sentiment", include_head=False)
    losses = train(mm, params, batch, labels, lr=2e-3 if train_head else 5e-3)

    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert first > 0.5, losses  # about ln 2 at the start
    assert last < (0.15 if train_head else 0.35), losses
    with torch.no_grad():
        out = mm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    accuracy = (out.logits.argmax(-1) == labels).float().mean().item()
    assert accuracy >= 0.9, accuracy

    with torch.no_grad():
        # The zero-initialised half of the module moved; the base did not; the head only if trained.
        zero_init = [u.lora_B if method == "lora" else u.up.weight for _, u in mm.units("sentiment")]
        assert all(p.abs().max() > 0 for p in zero_init), "the module did not learn"
        after = minilm.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in base.items()), "the frozen base changed"
        head_same = all(torch.equal(a, b) for a, b in zip(head_before, head.parameters(), strict=True))
        assert head_same is not train_head
        mm.deactivate()
        plain = minilm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert (out.hidden_states - plain).abs().max() > 1e-2, "the trained module does not change the model"
