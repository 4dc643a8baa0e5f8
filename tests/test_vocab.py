"""Vocabulary extension: learned pieces, the extended tokenizer, the embedding unit, the MLM head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import modfit
from modfit.methods.vocab import VocabUnit
from modfit.vocabulary import (
    VocabularyError,
    active_tokenizer,
    extended_tokenizer,
    initialise_lexically,
    learn_pieces,
)

TEXTS = [
    "wanafunzi walikwenda shuleni jana asubuhi",
    "walimu wanafundisha wanafunzi shuleni kila siku",
    "watoto wanacheza mpira uwanjani jana jioni",
    "wanafunzi wanasoma vitabu shuleni leo",
] * 10


@pytest.fixture(scope="module")
def pieces(minilm_tokenizer: Any) -> list[str]:
    return learn_pieces(minilm_tokenizer, TEXTS, 20)


def _extended_model(minilm: torch.nn.Module, tokenizer: Any, pieces: list[str]) -> modfit.ModularModel:
    mm = modfit.wrap(minilm)
    config = modfit.config(
        "union",
        components=[
            {"method": "pfeiffer"},
            {
                "method": "vocab",
                "tokens": pieces,
                "base_vocab": len(tokenizer),
                "unk_id": tokenizer.unk_token_id,
            },
        ],
    )
    mm.add("sw", config, head=modfit.head("mlm"))
    assert initialise_lexically(mm, "sw", tokenizer) == len(pieces)
    mm.activate("sw")
    mm.eval()
    return mm


def test_learned_pieces_are_new_and_shorten_the_text(minilm_tokenizer: Any, pieces: list[str]) -> None:
    base = minilm_tokenizer.get_vocab()
    assert 0 < len(pieces) <= 20 and not set(pieces) & set(base)
    extended = extended_tokenizer(minilm_tokenizer, pieces)
    assert len(extended) == len(minilm_tokenizer) + len(pieces)
    vocab = extended.get_vocab()
    assert [vocab[p] for p in pieces] == list(range(len(base), len(base) + len(pieces)))
    assert all(vocab[p] == i for p, i in base.items())  # every old id keeps its piece
    text = " ".join(TEXTS[:4])
    assert len(extended.tokenize(text)) < len(minilm_tokenizer.tokenize(text))


def test_unit_replaces_only_new_ids(
    minilm: torch.nn.Module, minilm_tokenizer: Any, pieces: list[str]
) -> None:
    mm = _extended_model(minilm, minilm_tokenizer, pieces)
    (unit,) = [p for _, u in mm.units("sw") for p in u.parts() if isinstance(p, VocabUnit)]
    embeddings = minilm.get_input_embeddings()
    v = len(minilm_tokenizer)
    ids = torch.tensor([[101, 2000, v, v + 3, 102]])
    with torch.no_grad():
        out = embeddings(ids)
        torch.testing.assert_close(out[0, :2], embeddings.weight[[101, 2000]], rtol=0, atol=0)
        torch.testing.assert_close(out[0, 2:4], unit.embeddings[[0, 3]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="past the extended vocabulary"):
        embeddings(torch.tensor([[v + len(pieces)]]))


def test_mlm_head_scores_new_pieces_and_they_learn(
    minilm: torch.nn.Module, minilm_tokenizer: Any, pieces: list[str]
) -> None:
    mm = _extended_model(minilm, minilm_tokenizer, pieces)
    extended = extended_tokenizer(minilm_tokenizer, pieces)
    enc = extended(TEXTS[:2], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    assert bool((labels >= len(minilm_tokenizer)).any())
    out = mm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert out.logits.shape[-1] == len(extended)
    params = mm.train_only("sw")
    mm.train()
    loss = mm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
    loss.backward()
    (unit,) = [p for _, u in mm.units("sw") for p in u.parts() if isinstance(p, VocabUnit)]
    assert unit.embeddings.grad is not None and unit.embeddings.grad.abs().sum() > 0
    assert unit.decoder_bias.grad is not None and unit.decoder_bias.grad.abs().sum() > 0
    assert any(p is unit.embeddings for p in params)


def test_save_load_identical(
    minilm: torch.nn.Module, minilm_tokenizer: Any, pieces: list[str], tmp_path: Path
) -> None:
    import copy

    fresh = copy.deepcopy(minilm)
    mm = _extended_model(minilm, minilm_tokenizer, pieces)
    with torch.no_grad():
        for p in mm.module_parameters("sw"):
            p.add_(torch.randn_like(p) * 0.01)
    extended = extended_tokenizer(minilm_tokenizer, pieces)
    enc = extended(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = mm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    mm.save("sw", tmp_path / "sw")
    other = modfit.wrap(fresh)
    other.load(tmp_path / "sw")
    other.activate("sw")
    other.eval()
    with torch.no_grad():
        after = other(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_active_tokenizer_reads_the_running_extension(
    minilm: torch.nn.Module, minilm_tokenizer: Any, pieces: list[str]
) -> None:
    """`modfit eval` tokenizes with what the active composition reads: the base tokenizer, or the
    one extended by a running module's pieces (their new ids), never two extensions at once."""
    mm = _extended_model(minilm, minilm_tokenizer, pieces)
    text = TEXTS[0]
    extended = active_tokenizer(mm, minilm_tokenizer)
    assert extended(text)["input_ids"] == extended_tokenizer(minilm_tokenizer, pieces)(text)["input_ids"]
    assert max(extended(text)["input_ids"]) >= len(minilm_tokenizer)
    mm.add("plain", modfit.config("pfeiffer"))
    mm.activate("plain")
    assert active_tokenizer(mm, minilm_tokenizer) is minilm_tokenizer
    mm.add("sw2", mm.records["sw"].config)
    mm.activate("stack(sw, sw2)")
    with pytest.raises(VocabularyError, match="modules sw, sw2 each extend the vocabulary"):
        active_tokenizer(mm, minilm_tokenizer)
    mm.activate("sw")
    with pytest.raises(VocabularyError, match="module 'sw' extends a vocabulary of 30522 pieces"):
        active_tokenizer(mm, extended)


def test_only_wordpiece_tokenizers() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])))
    with pytest.raises(VocabularyError, match="supports WordPiece tokenizers"):
        extended_tokenizer(bpe, ["ab"])


def test_config_errors(minilm_tokenizer: Any) -> None:
    with pytest.raises(modfit.ConfigError, match=r"vocab\.tokens: name at least one new piece"):
        modfit.config("vocab")
    with pytest.raises(modfit.ConfigError, match="duplicate"):
        modfit.config("vocab", tokens=["a", "a"])
    with pytest.raises(VocabularyError, match="already in the base vocabulary"):
        extended_tokenizer(minilm_tokenizer, ["the"])
