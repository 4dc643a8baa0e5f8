"""LayerNorm tuning's trainable-parameter counts against PEFT's LN_TUNING.

PEFT (`tuners/ln_tuning`) trains a copy of each targeted norm module, so its count is the size of
those modules' weights and biases; its default targets (`utils/constants.py`,
TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING) are gpt2: ln_1, ln_2, ln_f; llama:
input_layernorm, post_attention_layernorm, norm; t5: layer_norm, final_layer_norm; qwen2:
post_attention_layernorm. BERT has no default there; `target_modules=["LayerNorm"]` names all 25
LayerNorms (the embedding one too): 25 · 2 · 768 = 38,400. Shapes only (meta device).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import modfit


def _count(config: transformers.PretrainedConfig, model_class: str, **params: object) -> int:
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    mm = modfit.wrap(model)
    mm.add("m", modfit.config("ln", **params))
    return mm.trainable_parameters("m")


@pytest.mark.parametrize(
    ("config", "model_class", "params", "expected"),
    [
        # BERT-base: 24 LayerNorms in the layers (weight + bias); PEFT target_modules=["LayerNorm"]: 25
        (transformers.BertConfig(), "BertModel", {}, 24 * 2 * 768),
        (transformers.BertConfig(), "BertModel", {"outside_layers": True}, 38_400),
        (transformers.BertConfig(), "BertModel", {"targets": ("LayerNorm",)}, 38_400),
        # GPT-2 small, PEFT default ln_1, ln_2, ln_f
        (transformers.GPT2Config(), "GPT2Model", {"outside_layers": True}, 38_400),
        # Llama-2-7B shapes, PEFT default: 32 · 2 RMSNorms + the final one, weights only
        (transformers.LlamaConfig(), "LlamaModel", {"outside_layers": True}, 65 * 4096),
        # T5-small: 6 encoder blocks · 2 + 6 decoder blocks · 3 + 2 final norms, weights only
        (transformers.T5Config(), "T5Model", {"outside_layers": True}, 32 * 512),
        # Qwen2 (default config shapes), PEFT default post_attention_layernorm
        (transformers.Qwen2Config(), "Qwen2Model", {"targets": ("post_attention_layernorm",)}, 32 * 4096),
    ],
    ids=["bert", "bert-outside", "bert-LayerNorm", "gpt2", "llama", "t5", "qwen2"],
)
def test_module_parameter_count(
    config: transformers.PretrainedConfig, model_class: str, params: dict[str, object], expected: int
) -> None:
    assert _count(config, model_class, **params) == expected


def test_peft_numbers_by_hand() -> None:
    assert 25 * 2 * 768 == 38_400
    assert 65 * 4096 == 266_240
    assert (6 * 2 + 6 * 3 + 2) * 512 == 16_384
