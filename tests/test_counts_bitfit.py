"""BitFit's trainable-parameter counts. No peer library has BitFit (PEFT and adapters do not), so
the numbers come from the formula: every bias inside the layers, LayerNorm biases included.

BERT-base, per layer: query, key, value, attention output (4·h), FFN in (4h), FFN out (h) and two
LayerNorm biases (2·h) = 11h = 8,448; 12 layers: 101,376. The authors' code with `--bias-terms all`
also trains the embedding LayerNorm and pooler biases: 101,376 + 2·768 = 102,912. BERT-large:
24 · 11 · 1024 = 270,336, the paper's "0.08% of the parameters" (of 335M). GPT-2 small has the same
biases per layer (c_attn 3h, attention c_proj h, c_fc 4h, mlp c_proj h, ln_1 and ln_2): 101,376.
Models built on the meta device: shapes only.
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
    mm.add("m", modfit.config("bitfit", **params))
    return mm.trainable_parameters("m")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, 101_376),
        ({}, L * (7 * H + 4 * H)),
        ({"targets": ("all-linear", "all-norm", "embeddings.LayerNorm", "pooler.dense")}, 102_912),
        ({"targets": ("query", "value")}, L * 2 * H),
        ({"targets": ("all-norm",)}, L * 2 * H),
        ({"targets": ("all-linear",), "layers": (0,)}, 4 * H + 4 * H + H),
    ],
)
def test_bert_base(params: dict[str, object], expected: int) -> None:
    assert _count(transformers.BertConfig(), "BertModel", **params) == expected


def test_bert_large_is_the_papers_0_08_percent() -> None:
    config = transformers.BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    )
    count = _count(config, "BertModel")
    assert count == 24 * 11 * 1024 == 270_336
    with torch.device("meta"):
        total = sum(p.numel() for p in transformers.BertModel(config).parameters())
    assert round(100 * count / total, 2) == 0.08


def test_gpt2_small() -> None:
    assert _count(transformers.GPT2Config(), "GPT2Model") == 101_376


def test_bias_free_llama_gets_a_bias_per_projection_and_norm() -> None:
    """Llama-2-7B shapes: q, k, v, o (4 · 4096), gate and up (2 · 11008), down (4096), two RMSNorms."""
    per_layer = 4 * 4096 + 2 * 11008 + 4096 + 2 * 4096
    assert _count(transformers.LlamaConfig(), "LlamaModel") == 32 * per_layer == 1_622_016


def test_qwen2_trains_its_existing_qkv_biases() -> None:
    config = transformers.Qwen2Config(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4,
                                      num_hidden_layers=4, intermediate_size=2048)  # fmt: skip
    kv = 4 * (1024 // 16)
    assert _count(config, "Qwen2Model") == 4 * (1024 + 2 * kv)
