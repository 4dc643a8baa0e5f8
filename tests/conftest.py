"""Shared fixtures: tiny random-init models of every family, and the packaged pretrained MiniLM.

Every tiny model is built from a config in code (no downloads): hidden 32, 2 layers, vocabulary 100,
dropout 0, eval mode, weights from a fixed seed. `Family.build()` returns a fresh deep copy of one
prototype per family and dtype, so two builds are the same base, bit for bit, and building is cheap.

Fixtures:
    family        parametrised over every family (a test taking it runs once per family)
    tiny          name -> Family, for tests about one family
    minilm_path   the folder of `modfit.DEFAULT_BASE`
    minilm        a fresh copy of the pretrained MiniLM (`AutoModel`), eval mode
    minilm_tokenizer
    fast_linear_calls  a one-item list counting the F.linear calls modfit.fast_linear takes
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import transformers
from torch import nn

import modfit

VOCAB = 100
HIDDEN = 32
BATCH, SEQ = 2, 7

# Tiny models are all per-call overhead: one thread is several times faster than two, and far
# faster when other processes share the cores (OpenMP threads then wait on each other).
torch.set_num_threads(1)

_BERTLIKE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
_DECODER: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

Kind = Literal["encoder", "decoder", "seq2seq"]


@dataclass(frozen=True)
class Family:
    """One tiny model family.

    Attributes:
        name: the fixture id; model_type: its `config.model_type`.
        kind: "encoder" (bare `*Model`, output last_hidden_state), "decoder" (`*ForCausalLM`,
            output logits) or "seq2seq" (T5ForConditionalGeneration, needs decoder_input_ids).
        targets: LoRA targets by module-name suffix (for when the family has no table row).
    """

    name: str
    model_type: str
    kind: Kind
    model_class: str
    config_class: str
    config: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ()

    def build(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A fresh model: the same weights every time (seeded), eval mode."""
        return copy.deepcopy(_prototype(self.name, dtype))

    def inputs(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Inputs for the full model: ids 3..VOCAB-1, the second row right-padded by 2 tokens."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, -2:] = 0
        ids[1, -2:] = 0
        out = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "seq2seq":
            out["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 5), generator=g)
        return out

    def encoder_inputs(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Inputs for head mode (`mm(...)`): input_ids and attention_mask only."""
        inputs = self.inputs(seed)
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}

    def run(self, model: nn.Module, seed: int = 0) -> torch.Tensor:
        """The model's first output (last_hidden_state or logits) on `inputs(seed)`."""
        out = model(**self.inputs(seed))
        return out[0]

    @property
    def config_obj(self) -> transformers.PretrainedConfig:
        return getattr(transformers, self.config_class)(**self.config)


@functools.cache
def _prototype(name: str, dtype: torch.dtype) -> nn.Module:
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, family.model_class)(family.config_obj)
    return model.to(dtype).eval()


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("bert", "bert", "encoder", "BertModel", "BertConfig", _BERTLIKE, ("query", "value")),
        Family(
            "roberta", "roberta", "encoder", "RobertaModel", "RobertaConfig", _BERTLIKE, ("query", "value")
        ),
        Family(
            "xlm-roberta",
            "xlm-roberta",
            "encoder",
            "XLMRobertaModel",
            "XLMRobertaConfig",
            _BERTLIKE,
            ("query", "value"),
        ),
        # embedding_size != hidden_size: ElectraModel adds `embeddings_project`.
        Family(
            "electra",
            "electra",
            "encoder",
            "ElectraModel",
            "ElectraConfig",
            {**_BERTLIKE, "embedding_size": 16},
            ("query", "value"),
        ),
        Family(
            "distilbert",
            "distilbert",
            "encoder",
            "DistilBertModel",
            "DistilBertConfig",
            dict(
                vocab_size=VOCAB,
                dim=HIDDEN,
                n_layers=2,
                n_heads=4,
                hidden_dim=64,
                max_position_embeddings=64,
                dropout=0.0,
                attention_dropout=0.0,
            ),
            ("q_lin", "v_lin"),
        ),
        Family(
            "gpt2",
            "gpt2",
            "decoder",
            "GPT2LMHeadModel",
            "GPT2Config",
            dict(
                vocab_size=VOCAB,
                n_embd=HIDDEN,
                n_layer=2,
                n_head=4,
                n_positions=128,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            ("c_attn",),  # fused query/key/value
        ),
        Family(
            "llama", "llama", "decoder", "LlamaForCausalLM", "LlamaConfig", _DECODER, ("q_proj", "v_proj")
        ),
        Family(
            "mistral",
            "mistral",
            "decoder",
            "MistralForCausalLM",
            "MistralConfig",
            _DECODER,
            ("q_proj", "v_proj"),
        ),
        Family(
            "qwen2", "qwen2", "decoder", "Qwen2ForCausalLM", "Qwen2Config", _DECODER, ("q_proj", "v_proj")
        ),
        Family(
            "t5",
            "t5",
            "seq2seq",
            "T5ForConditionalGeneration",
            "T5Config",
            dict(
                vocab_size=VOCAB,
                d_model=HIDDEN,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                dropout_rate=0.0,
                feed_forward_proj="relu",
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            ),
            ("q", "v"),
        ),
    )
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    """Every tiny model family in turn."""
    return FAMILIES[request.param]


@pytest.fixture
def tiny() -> Callable[[str], Family]:
    """Look up one family by name: `tiny("gpt2").build()`."""
    return FAMILIES.__getitem__


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The packaged pretrained all-MiniLM-L6-v2 folder (`modfit.DEFAULT_BASE`)."""
    return Path(modfit.DEFAULT_BASE)


@functools.cache
def _minilm_prototype(path: str) -> nn.Module:
    return transformers.AutoModel.from_pretrained(path).eval()


@pytest.fixture
def minilm(minilm_path: Path) -> nn.Module:
    """A fresh copy of the pretrained MiniLM (BertModel, hidden 384, 6 layers), eval mode."""
    return copy.deepcopy(_minilm_prototype(str(minilm_path)))


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path))


@pytest.fixture
def fast_linear_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the F.linear calls `modfit.fast_linear` takes (its route returning a result)."""
    from modfit import fast_linear

    calls = [0]
    route = fast_linear.route

    def counting(call: dict[str, Any]) -> torch.Tensor | None:
        out = route(call)
        calls[0] += out is not None
        return out

    monkeypatch.setattr(fast_linear, "route", counting)
    return calls
