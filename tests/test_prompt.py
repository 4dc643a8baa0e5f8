"""Prompt tuning against a hand-built extended input, generation, initialisation and composition.

The reference for every family: the plain base model (no module) run on
inputs_embeds = [P; embed(ids)] with the attention mask extended by n ones, first n outputs removed
(for T5 the encoder gets that input and the decoder cross-attends to the real positions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

import modfit
from modfit.methods.prompt import PromptUnit
from modfit.model import ModularModel

if TYPE_CHECKING:
    from conftest import Family

N = 3


def _prompt(mm: ModularModel, name: str = "p", seed: int = 0) -> torch.Tensor:
    """Give module `name`'s prompt random N(0, 0.5²) values (the init copies vocabulary rows); return it."""
    (unit,) = [u for _, u in mm.units(name)]
    assert isinstance(unit, PromptUnit)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        unit.prompt_embeddings.copy_(torch.randn(unit.prompt_embeddings.shape, generator=g) * 0.5)
    return unit.prompt_embeddings.detach()


def _extended(
    model: nn.Module, prompt: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> dict[str, Any]:
    embeds = model.get_input_embeddings()(ids)  # type: ignore[operator]
    batch = ids.shape[0]
    return {
        "inputs_embeds": torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1),
        "attention_mask": torch.cat([torch.ones(batch, prompt.shape[0], dtype=mask.dtype), mask], dim=1),
    }


@torch.no_grad()
def test_equals_hand_built_extended_input(family: Family) -> None:
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prompt", num_virtual_tokens=N))
    prompt = _prompt(mm)
    inputs = family.inputs()
    mm.activate("p")
    out = model(**inputs, output_hidden_states=family.kind != "seq2seq")
    mm.deactivate()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if family.kind == "seq2seq":
        encoded = model.get_encoder()(**_extended(model, prompt, ids, mask)).last_hidden_state[:, N:]
        reference = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
            attention_mask=mask,
            decoder_input_ids=inputs["decoder_input_ids"],
        )[0]
    else:
        reference = model(**_extended(model, prompt, ids, mask))[0][:, N:]
        assert all(h.shape[1] == ids.shape[1] for h in out.hidden_states)  # aligned with the real tokens
    assert torch.equal(out[0], reference)


@torch.no_grad()
def test_head_mode_sees_the_real_tokens(tiny: Callable[[str], Family]) -> None:
    family = tiny("bert")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prompt", num_virtual_tokens=N), head=modfit.head("token-cls", ["a", "b"]))
    prompt = _prompt(mm)
    mm.activate("p")
    inputs = family.encoder_inputs()
    out = mm(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    mm.deactivate()
    hidden = model(**_extended(model, prompt, inputs["input_ids"], inputs["attention_mask"]))[0][:, N:]
    assert torch.equal(out.hidden_states, hidden)


@torch.no_grad()
def test_token_type_ids_get_zeros_for_the_prompt(tiny: Callable[[str], Family]) -> None:
    family = tiny("bert")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prompt", num_virtual_tokens=N))
    prompt = _prompt(mm)
    inputs = family.inputs()
    types = torch.ones_like(inputs["input_ids"])
    mm.activate("p")
    out = model(**inputs, token_type_ids=types)[0]
    mm.deactivate()
    extended = _extended(model, prompt, inputs["input_ids"], inputs["attention_mask"])
    zeros = torch.zeros(types.shape[0], N, dtype=types.dtype)
    assert torch.equal(out, model(**extended, token_type_ids=torch.cat([zeros, types], 1))[0][:, N:])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@torch.no_grad()
def test_generate_equals_hand_built_loop(tiny: Callable[[str], Family], name: str) -> None:
    """Greedy generation with the cache (prompt on the first step only) equals recomputing the whole
    extended input at every step without modfit; the second row is left-padded."""
    model = tiny(name).build()
    model.generation_config.eos_token_id = None  # always generate every token
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prompt", num_virtual_tokens=N))
    prompt = _prompt(mm, seed=1)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    mm.activate("p")
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    mm.deactivate()
    seq, seq_mask = ids, mask
    for _ in range(6):
        positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)  # as generate derives them from the mask
        head = torch.arange(N).expand(2, N)
        logits = model(
            **_extended(model, prompt, seq, seq_mask), position_ids=torch.cat([head, positions + N], 1)
        ).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        seq, seq_mask = torch.cat([seq, token], 1), torch.cat([seq_mask, torch.ones_like(token)], 1)
    assert torch.equal(generated, seq)


@torch.no_grad()
def test_t5_generate_runs_and_decoder_is_untouched(tiny: Callable[[str], Family]) -> None:
    model = tiny("t5").build()
    mm = modfit.wrap(model)
    mm.add("p", modfit.config("prompt", num_virtual_tokens=N))
    assert [path for path, _ in mm.units("p")] == ["encoder"]
    _prompt(mm)
    mm.activate("p")
    inputs = tiny("t5").encoder_inputs()
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2


def test_stacked_prompts_add_up(tiny: Callable[[str], Family]) -> None:
    family = tiny("llama")
    model = family.build()
    mm = modfit.wrap(model)
    mm.add("a", modfit.config("prompt", num_virtual_tokens=2))
    mm.add("b", modfit.config("prompt", num_virtual_tokens=3))
    a, b = _prompt(mm, "a", seed=1), _prompt(mm, "b", seed=2)
    inputs = family.inputs()
    mm.activate("stack(a, b)")
    with torch.no_grad():
        out = model(**inputs)[0]
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        mm.deactivate()
        # b's pre-hook runs last, so its tokens come first: [b; a; tokens]
        reference = model(
            **_extended(model, torch.cat([b, a]), inputs["input_ids"], inputs["attention_mask"])
        )
    assert torch.equal(out, reference[0][:, 5:])
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_vocab_init_copies_text_or_random_tokens(minilm: nn.Module, minilm_tokenizer: Any) -> None:
    mm = modfit.wrap(minilm)
    weight = minilm.get_input_embeddings().weight.detach()
    mm.add("t", modfit.config("prompt", num_virtual_tokens=5, init_text="great movie"))
    ids = minilm_tokenizer("great movie", add_special_tokens=False)["input_ids"]
    expected = weight[torch.tensor((ids * 5)[:5])]
    (unit,) = [u for _, u in mm.units("t")]
    assert torch.equal(unit.prompt_embeddings.detach(), expected)

    mm.add("v", modfit.config("prompt", num_virtual_tokens=5))
    (unit,) = [u for _, u in mm.units("v")]
    rows = unit.prompt_embeddings.detach()
    assert all(any(torch.equal(row, w) for w in weight) for row in rows)  # each row is a vocabulary row

    mm.add("r", modfit.config("prompt", num_virtual_tokens=50, init="random"))
    (unit,) = [u for _, u in mm.units("r")]
    std = float(unit.prompt_embeddings.detach().std())
    assert 0.5 < std / float(weight.std()) < 1.5  # drawn at the embeddings' own scale


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"num_virtual_tokens": 0}, "prompt.num_virtual_tokens"),
        ({"init": "text"}, "prompt.init"),
        ({"init": "random", "init_text": "hello"}, "prompt.init_text"),
        ({"init_text": "  "}, "prompt.init_text"),
    ],
)
def test_config_validation(params: dict[str, Any], match: str) -> None:
    with pytest.raises(modfit.ConfigError, match=match):
        modfit.config("prompt", **params)


def test_not_mergeable_and_lr_default(tiny: Callable[[str], Family]) -> None:
    config = modfit.config("prompt")
    assert not config.identity_at_init
    assert config.default_lr is not None and config.default_lr > 1e-2
    mm = modfit.wrap(tiny("bert").build())
    mm.add("p", config)
    with pytest.raises(ValueError, match="cannot be merged"):
        mm.merge("p")
