"""Sparse fine-tuning's trainable-parameter counts: k, exactly.

composable-sft has no count convention beyond its k: `LotteryTicketSparseFineTuner` trains
`ft_params_num` entries, or `int(ft_params_proportion × maskable parameters)` (`lt_sft.py`), the
rounding down modfit's `density` follows. PEFT and `adapters` have no lottery-ticket SFT (PEFT's
SHiRA sizes its random mask like a LoRA rank instead). The maskable parameters here are the targeted
weight matrices; on BERT-base every projection of the 12 layers holds 12 · (4 · 768² + 2 · 768 · 3072)
= 84,934,656 entries, and GPT-2 small's Conv1D projections as many. Shapes only (meta device).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import modfit
from modfit.methods.sft import dense

H, L = 768, 12
BERT_LINEAR = L * (4 * H * H + 2 * H * 4 * H)  # 84,934,656


def _wrapped(config: transformers.PretrainedConfig, model_class: str) -> modfit.ModularModel:
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    return modfit.wrap(model)


@pytest.mark.parametrize(
    ("config", "model_class", "params", "expected"),
    [
        (transformers.BertConfig(), "BertModel", {}, 849_346),  # int(0.01 · 84,934,656)
        (transformers.BertConfig(), "BertModel", {"k": 1000}, 1000),
        (transformers.BertConfig(), "BertModel", {"density": 0.05, "targets": ("query", "value")}, 707_788),
        (transformers.BertConfig(), "BertModel", {"selection": "random", "layers": (0,)}, 70_778),
        (transformers.GPT2Config(), "GPT2Model", {}, 849_346),
        # Llama-2-7B widths, 2 layers: 2 · (4 · 4096² + 3 · 4096 · 11008) = 404,750,336 entries
        (transformers.LlamaConfig(num_hidden_layers=2), "LlamaModel", {"density": 0.001}, 404_750),
    ],
)
def test_k_entries(
    config: transformers.PretrainedConfig, model_class: str, params: dict[str, object], expected: int
) -> None:
    mm = _wrapped(config, model_class)
    mm.add("m", modfit.config("sft", **params))
    assert mm.trainable_parameters("m") == expected


def test_by_hand() -> None:
    assert BERT_LINEAR == 84_934_656
    assert int(0.01 * BERT_LINEAR) == 849_346
    assert int(0.05 * L * 2 * H * H) == 707_788
    assert int(0.01 * (4 * H * H + 2 * H * 4 * H)) == 70_778


def test_dense_phase_trains_every_targeted_entry() -> None:
    mm = _wrapped(transformers.BertConfig(), "BertModel")
    mm.add("m", modfit.config("sft", targets=("query", "value")))
    dense(mm, "m")  # LT-SFT's first phase: as many as full fine-tuning of those weights
    assert mm.trainable_parameters("m") == L * 2 * H * H
