"""Prefix tuning's trainable-parameter counts on BERT-base equal PEFT's.

PEFT's `PrefixEncoder` (src/peft/tuners/prefix_tuning/model.py), token_dim = 768, num_layers = 12:
- without projection: `nn.Embedding(num_virtual_tokens, num_layers * 2 * token_dim)`, so 20 tokens train
  20 × 12 × 2 × 768 = 368,640 (the number issue 3 quotes);
- with `prefix_projection=True`: `nn.Embedding(n, token_dim)`, then `Linear(token_dim, encoder_hidden_size)`,
  `Tanh`, `Linear(encoder_hidden_size, num_layers * 2 * token_dim)` (weights and biases). With
  encoder_hidden_size = 768: 15,360 + (768·768 + 768) + (768·18,432 + 18,432) = 14,780,160.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import modfit

H, L = 768, 12


def _prefix_encoder(n: int, inner: int | None) -> int:
    """PEFT's PrefixEncoder parameter count on BERT-base (inner: encoder_hidden_size, None: no MLP)."""
    out = L * 2 * H
    if inner is None:
        return n * out
    return n * H + (H * inner + inner) + (inner * out + out)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, 368_640),
        ({"num_virtual_tokens": 20}, _prefix_encoder(20, None)),
        ({"num_virtual_tokens": 5}, _prefix_encoder(5, None)),
        ({"prefix_projection": True}, 14_780_160),
        ({"prefix_projection": True, "encoder_hidden_size": 512}, _prefix_encoder(20, 512)),
    ],
)
def test_prefix_count_on_bert_base(params: dict[str, object], expected: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = transformers.BertModel(transformers.BertConfig())
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("prefix", **params))
    assert mm.trainable_parameters("m") == expected


def test_peft_numbers_by_hand() -> None:
    assert 20 * L * 2 * H == 368_640
    assert 20 * H + (H * H + H) + (H * L * 2 * H + L * 2 * H) == 14_780_160
