"""Prompt tuning's trainable-parameter count on BERT-base equals PEFT's.

PEFT's `PromptEmbedding` (src/peft/tuners/prompt_tuning/model.py) is
`nn.Embedding(num_virtual_tokens * num_transformer_submodules, token_dim)`: one submodule for an encoder,
token_dim = 768 on BERT-base, so 20 virtual tokens train 20 × 768 = 15,360 parameters (the number issue 3
quotes). modfit's prompt is the same (n, word-embedding width) table.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import modfit

H = 768


@pytest.mark.parametrize(("n", "expected"), [(20, 15_360), (1, H), (100, 100 * H)])
def test_prompt_count_on_bert_base(n: int, expected: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = transformers.BertModel(transformers.BertConfig())
    mm = modfit.wrap(model)
    for init in ("vocab", "random"):
        mm.add(init, modfit.config("prompt", num_virtual_tokens=n, init=init))
        assert mm.trainable_parameters(init) == expected


def test_peft_number_by_hand() -> None:
    assert 20 * H == 15_360
