"""(IA)³ trainable-parameter counts against PEFT.

The expected numbers are PEFT's own: peft 0.21.2 (with transformers 5.23), `get_peft_model(model,
IA3Config())` on the same random-init configs, counting parameters with requires_grad. The outputs
also matched PEFT's bit for bit on tiny BERT, GPT-2 and T5 with random vectors, merged and unmerged
(a cross-check run outside this suite, which does not depend on peft). By hand:

- BERT-base (PEFT: key, value, output.dense; output.dense feed-forward, which by suffix also matches
  attention.output.dense): 12 × (768 + 768 + 768 + 3072) = 64,512; RoBERTa-base the same.
- GPT-2 small (c_attn output, all of q/k/v, and mlp.c_proj input): 12 × (2304 + 3072) = 64,512.
- Llama (2 layers of the default 4096/11008 config; k_proj, v_proj outputs, down_proj input):
  2 × (4096 + 4096 + 11008) = 38,400; Qwen2 scales q_proj instead of k_proj: 2 × (4096 + 4096 + 22016).
- T5 (2 + 2 blocks of t5-small width; k and v of self and cross attention, wo input): encoder
  2 × (512 + 512 + 2048), decoder 2 × (4 · 512 + 2048): 14,336.

Models are built on the meta device: shapes only.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

import modfit

H, L = 768, 12


def _count(model_class: str, config: transformers.PretrainedConfig, **params: Any) -> int:
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("ia3", **params))
    return mm.trainable_parameters("m")


@pytest.mark.parametrize(
    ("model_class", "config", "expected"),
    [
        ("BertModel", transformers.BertConfig(), 64_512),
        ("RobertaModel", transformers.RobertaConfig(), 64_512),
        ("GPT2Model", transformers.GPT2Config(), 64_512),
        ("LlamaModel", transformers.LlamaConfig(num_hidden_layers=2), 38_400),
        ("Qwen2Model", transformers.Qwen2Config(num_hidden_layers=2), 60_416),
        ("T5Model", transformers.T5Config(num_layers=2), 14_336),
    ],
)
def test_default_placement_equals_peft(
    model_class: str, config: transformers.PretrainedConfig, expected: int
) -> None:
    assert _count(model_class, config) == expected


def test_bert_base_by_hand() -> None:
    assert L * (H + H + H + 4 * H) == 64_512
    assert _count("BertModel", transformers.BertConfig()) == 64_512


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # the paper's placement: keys, values and the FFN activations only
        ({"targets": ("key", "value", "ffn_out"), "feedforward": ("ffn_out",)}, L * (H + H + 4 * H)),
        ({"targets": ("query", "value"), "feedforward": ()}, L * 2 * H),
        ({"targets": ("ffn_in",), "feedforward": ("ffn_in",)}, L * H),
        ({"targets": ("ffn_in",)}, L * 4 * H),  # the default feed-forward roles are not among the targets
        ({"layers": (0, 11)}, 2 * (H + H + H + 4 * H)),
        ({"targets": ("re:.*attention\\.self\\.(key|value)",)}, L * 2 * H),
    ],
)
def test_bert_base_other_placements(params: dict[str, Any], expected: int) -> None:
    assert _count("BertModel", transformers.BertConfig(), **params) == expected
