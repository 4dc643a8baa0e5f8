"""DoRA's trainable-parameter counts against PEFT's `LoraConfig(use_dora=True)`.

PEFT's DoRA adds to LoRA's A and B one `lora_magnitude_vector` per target, a `DoraLinearLayer`
whose weight is the norm per output feature (`tuners/lora/dora.py`, `get_weight_norm`: shape
(out_features,)). r=8 on BERT-base query and value: LoRA's 12 · 2 · 8 · (768 + 768) = 294,912 plus
12 · 2 · 768 = 18,432 magnitudes = 313,344. Shapes only (meta device).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import modfit

H, L = 768, 12


def _count(config: transformers.PretrainedConfig, model_class: str, **params: object) -> int:
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("dora", **params))
    return mm.trainable_parameters("m")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"r": 8}, 313_344),
        ({"r": 8, "targets": ("query", "value")}, 294_912 + L * 2 * H),
        ({"r": 4, "targets": ("ffn_in",)}, L * (4 * (H + 4 * H) + 4 * H)),
        (
            {"r": 16, "targets": ("all-linear",)},
            L * (4 * (16 * 2 * H + H) + 16 * 5 * H + 4 * H + 16 * 5 * H + H),
        ),
    ],
)
def test_bert_base(params: dict[str, object], expected: int) -> None:
    assert _count(transformers.BertConfig(), "BertModel", **params) == expected


def test_gpt2_fused_qkv_conv1d() -> None:
    """GPT-2 small, PEFT's default c_attn (Conv1D, weight (768, 2304)): 8 · (768 + 2304) + 2304 per layer."""
    assert _count(transformers.GPT2Config(), "GPT2Model", r=8) == L * (8 * (768 + 2304) + 2304)
