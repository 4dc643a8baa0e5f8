"""Prefix tuning against hand-built computations: encoders, decoders, T5, generation, reparametrisation.

References, computed without modfit on the same base weights:
- BERT family and causal decoders: the plain model run with a `DynamicCache` filled by hand with the
  prefix keys/values (what attention over [prefix; tokens] means in HuggingFace's own code), the
  attention mask extended by n ones (BERT: tokens at their own positions 0..L-1);
- DistilBERT (whose attention takes no cache): a one-layer model computed by hand;
- generation: greedy tokens equal a loop that re-runs the whole sequence on a fresh filled cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import torch
import transformers
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

import modfit
from modfit.methods.prefix import PrefixStackUnit
from modfit.methods.prompt import cache_keyword
from modfit.model import ModularModel

if TYPE_CHECKING:
    from conftest import Family

N = 3


def _stacks(mm: ModularModel, name: str = "p") -> dict[str, PrefixStackUnit]:
    """Module `name`'s stack units by path, with random N(0, 0.5²) parameters."""
    stacks = {path: u for path, u in mm.units(name) if isinstance(u, PrefixStackUnit)}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for unit in stacks.values():
            for p in unit.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return stacks


def _filled(stack: PrefixStackUnit, batch: int, cache: Any = None) -> Any:
    """A cache holding the prefix of every layer, filled by hand: (batch, heads, n, head_dim) per layer."""
    cache = DynamicCache() if cache is None else cache
    values = stack.values().detach()  # (n, layers, 2, width)
    for layer in range(stack.layers):
        k, v = (values[:, layer, i].view(N, stack.heads, -1).transpose(0, 1) for i in (0, 1))
        cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer)
    return cache


def _extend(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(mask.shape[0], N, dtype=mask.dtype), mask], dim=1)


@pytest.mark.parametrize("name", ["bert", "electra", "gpt2", "llama", "qwen2"])
@torch.no_grad()
def test_equals_model_on_a_filled_cache(tiny: Callable[[str], Family], name: str) -> None:
    family = tiny(name)
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prefix", num_virtual_tokens=N))
    (stack,) = _stacks(mm).values()
    inputs = family.inputs()
    mm.activate("p")
    out = model(**inputs)[0]
    mm.deactivate()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # an encoder keeps its tokens' positions; a causal stack places them after the n cached entries
    positions = {"position_ids": torch.arange(ids.shape[1]).unsqueeze(0)} if family.kind == "encoder" else {}
    reference = model(
        input_ids=ids, attention_mask=_extend(mask), **{cache_keyword(model): _filled(stack, 2)}, **positions
    )
    torch.testing.assert_close(out, reference[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_distilbert_equals_attention_computed_by_hand(tiny: Callable[[str], Family]) -> None:
    """One DistilBERT layer: softmax(q [P_k; K]ᵀ/√d + mask) [P_v; V], then the layer's norms and FFN."""
    family = tiny("distilbert")
    torch.manual_seed(0)
    model = transformers.DistilBertModel(
        transformers.DistilBertConfig(**{**family.config, "n_layers": 1})
    ).eval()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prefix", num_virtual_tokens=N))
    (stack,) = _stacks(mm).values()
    inputs = family.inputs()
    mm.activate("p")
    out = model(**inputs)[0]
    mm.deactivate()

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, length = ids.shape
    layer = model.transformer.layer[0]
    attention = layer.attention
    heads = attention.n_heads
    x = model.embeddings(ids)  # (B, L, H)
    values = stack.values()  # (n, 1, 2, H)
    k = torch.cat([values[:, 0, 0].expand(batch, -1, -1), attention.k_lin(x)], 1)  # (B, n + L, H)
    v = torch.cat([values[:, 0, 1].expand(batch, -1, -1), attention.v_lin(x)], 1)

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, S, H) -> (B, heads, S, H / heads)
        return t.view(batch, t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(attention.q_lin(x)), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, heads, L, n + L)
    scores = scores.masked_fill(_extend(mask)[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
    attended = layer.sa_layer_norm(attention.out_lin(context) + x)
    reference = layer.output_layer_norm(layer.ffn(attended) + attended)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


@torch.no_grad()
def test_t5_decoder_equals_model_on_a_filled_cache(tiny: Callable[[str], Family]) -> None:
    """T5 has a prefix in the encoder's and the decoder's self-attention; given the encoder's output, the
    decoder equals the plain decoder on a self-attention cache filled by hand."""
    family = tiny("t5")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prefix", num_virtual_tokens=N))
    stacks = _stacks(mm)
    assert sorted(stacks) == ["decoder", "encoder"]
    inputs = family.inputs()
    mm.activate("p")
    out = model(**inputs)[0]
    encoded = model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    mm.deactivate()
    plain = model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert not torch.allclose(encoded.last_hidden_state, plain.last_hidden_state)  # the encoder has one too
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    _filled(stacks["decoder"], 2, cache.self_attention_cache)
    decoder_ids = inputs["decoder_input_ids"]
    reference = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=encoded.last_hidden_state),
        attention_mask=inputs["attention_mask"],
        decoder_input_ids=decoder_ids,
        decoder_attention_mask=_extend(torch.ones_like(decoder_ids)),
        **{cache_keyword(model): cache},
    )[0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@torch.no_grad()
def test_generate_equals_hand_built_loop(tiny: Callable[[str], Family], name: str) -> None:
    """Greedy generation (the prefix filled into generate's cache once) equals re-running the whole
    sequence on a fresh hand-filled cache at every step; the second row is left-padded."""
    model = tiny(name).build()
    model.generation_config.eos_token_id = None  # always generate every token
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prefix", num_virtual_tokens=N))
    (stack,) = _stacks(mm).values()
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    mm.activate("p")
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    mm.deactivate()
    seq, seq_mask = ids, mask
    for _ in range(6):
        positions = (seq_mask.cumsum(-1) - 1).clamp(min=0) + N  # tokens come after the n cache entries
        logits = model(
            input_ids=seq,
            attention_mask=_extend(seq_mask),
            position_ids=positions,
            **{cache_keyword(model): _filled(stack, 2)},
        ).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        seq, seq_mask = torch.cat([seq, token], 1), torch.cat([seq_mask, torch.ones_like(token)], 1)
    assert torch.equal(generated, seq)


@torch.no_grad()
def test_t5_and_stacked_modules_generate(tiny: Callable[[str], Family]) -> None:
    t5 = tiny("t5")
    model = t5.build()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prefix", num_virtual_tokens=N))
    _stacks(mm)
    mm.activate("p")
    assert model.generate(**t5.encoder_inputs(), max_new_tokens=4, do_sample=False).shape[0] == 2

    llama = tiny("llama")
    model = llama.build()
    mm = modfit.wrap(model)
    mm.add("a", modfit.config("prefix", num_virtual_tokens=2))
    mm.add("b", modfit.config("prompt", num_virtual_tokens=2))
    mm.add("c", modfit.config("prefix", num_virtual_tokens=3))
    mm.activate("stack(a, b, c)")
    inputs = llama.inputs()
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    steps = model(**inputs).logits
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert steps.shape[:2] == inputs["input_ids"].shape


def test_projection_is_peft_prefix_encoder(tiny: Callable[[str], Family]) -> None:
    model = tiny("bert").build()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prefix", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16))
    (stack,) = _stacks(mm).values()
    assert stack.transform is not None
    expected = stack.transform(stack.embedding.weight).view(N, 2, 2, 32)  # (n, layers, k/v, width)
    assert torch.equal(stack.values(), expected)
    hidden, inner, layers = 32, 16, 2
    count = N * hidden + (hidden * inner + inner) + (inner * layers * 2 * hidden + layers * 2 * hidden)
    assert mm.trainable_parameters("p") == count


@torch.no_grad()
def test_no_table_left_after_a_pass(tiny: Callable[[str], Family]) -> None:
    family = tiny("bert")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prefix", num_virtual_tokens=N))
    (stack,) = _stacks(mm).values()
    mm.activate("p")
    model(**family.inputs())
    assert stack.table.get() is None  # no activations kept alive between passes


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"num_virtual_tokens": 0}, "prefix.num_virtual_tokens"),
        ({"prefix_projection": True, "encoder_hidden_size": 0}, "prefix.encoder_hidden_size"),
        ({"encoder_hidden_size": 64}, "prefix.encoder_hidden_size"),
    ],
)
def test_config_validation(params: dict[str, Any], match: str) -> None:
    with pytest.raises(modfit.ConfigError, match=match):
        modfit.config("prefix", **params)


def test_unknown_family_is_refused() -> None:
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.BertModel(config)
    model.config.model_type = "not-in-the-table"
    with pytest.raises(modfit.TargetError, match="architecture table"):
        modfit.wrap(model).add("p", modfit.config("prefix"))


def test_gradient_checkpointing_is_refused_on_causal_stacks(tiny: Callable[[str], Family]) -> None:
    """transformers' checkpointed layers drop past_key_values, which would silently remove the prefix."""
    family = tiny("llama")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prefix", num_virtual_tokens=N))
    mm.activate("p")
    # transformers 5.x's name where it exists (it deprecates the old one), 4.x's otherwise
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    enable()
    model.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(**family.inputs())
