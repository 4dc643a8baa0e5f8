"""Learning new word pieces from target-language text and building the extended tokenizer.

    pieces = learn_pieces(tokenizer, texts, size=3000)           # pieces the base vocabulary lacks
    config = modfit.config("vocab", tokens=pieces, base_vocab=len(tokenizer), unk_id=tokenizer.unk_token_id)
    mm.add("sw-vocab", config)                                   # or as a union member of a language module
    initialise_lexically(mm, "sw-vocab", tokenizer)              # each new row: mean of its base pieces
    extended = extended_tokenizer(tokenizer, pieces)             # ids < V unchanged, new pieces V, V+1, ...

Only WordPiece tokenizers (the BERT family) are supported: new pieces are appended to the WordPiece
vocabulary, so the greedy longest-match segmentation picks them up inside words, and every old id keeps
its meaning. The extended tokenizer is rebuilt from the base tokenizer and the piece list whenever it
is needed, so a saved module carries its pieces in its card and no tokenizer files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from .model import ModularModel

if TYPE_CHECKING:
    from .methods.vocab import VocabConfig


class VocabularyError(ValueError):
    """A tokenizer that cannot be extended, or pieces that do not fit it."""


def _wordpiece(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabularyError("vocabulary extension needs a fast (Rust) tokenizer")
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "WordPiece":
        raise VocabularyError(
            f"vocabulary extension supports WordPiece tokenizers (BERT family); this one is "
            f"{spec.get('model', {}).get('type')}"
        )
    return dict(spec)


def learn_pieces(tokenizer: Any, texts: Iterable[str], size: int, *, min_frequency: int = 2) -> list[str]:
    """The most useful word pieces of `texts` that the base vocabulary lacks, at most `size`.

    A WordPiece vocabulary is trained on `texts` with the base tokenizer's own normalisation and
    pre-tokenisation (`train_new_from_iterator`), at a size of len(base) + size so it can afford the
    target language's frequent words; its pieces absent from the base vocabulary are kept, in the new
    vocabulary's order (frequent first), skipping special tokens.
    """
    _wordpiece(tokenizer)
    if size < 1:
        raise VocabularyError(f"size must be >= 1, got {size}")
    base = tokenizer.get_vocab()
    trained = tokenizer.train_new_from_iterator(
        list(texts), vocab_size=len(base) + size, min_frequency=min_frequency
    )
    special = set(tokenizer.all_special_tokens)
    ordered = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
    new = [piece for piece, _ in ordered if piece not in base and piece not in special and piece.strip("#")]
    return new[:size]


def extended_tokenizer(tokenizer: Any, pieces: Sequence[str]) -> Any:
    """A copy of `tokenizer` whose WordPiece vocabulary also holds `pieces`, at ids V, V+1, ...

    Raises:
        VocabularyError: not a WordPiece tokenizer, or a piece is already in the vocabulary.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = _wordpiece(tokenizer)
    vocab: dict[str, int] = spec["model"]["vocab"]
    clash = [p for p in pieces if p in vocab]
    if clash:
        raise VocabularyError(f"pieces already in the base vocabulary: {', '.join(clash[:5])}")
    start = max(vocab.values()) + 1
    for offset, piece in enumerate(pieces):
        vocab[piece] = start + offset
    backend = Tokenizer.from_str(json.dumps(spec))
    specials = {
        key: getattr(tokenizer, key)
        for key in (
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
            "bos_token",
            "eos_token",
        )
        if getattr(tokenizer, key, None) is not None
    }
    extended = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=tokenizer.model_max_length, **specials
    )
    extended.padding_side = tokenizer.padding_side
    return extended


def _vocab_config(mm: ModularModel, name: str) -> VocabConfig | None:
    """Module `name`'s vocabulary extension: its config, or its union member's; None without one."""
    from .methods.vocab import VocabConfig

    config = mm.records[name].config
    members = getattr(config, "components", (config,))
    return next((c for c in members if isinstance(c, VocabConfig)), None)


def active_tokenizer(mm: ModularModel, tokenizer: Any) -> Any:
    """The tokenizer the active composition reads: `tokenizer` itself, or, when a running module
    extends the vocabulary, `tokenizer` extended by its pieces (so its new ids are used).

    Raises:
        VocabularyError: two running modules extend the vocabulary (their new pieces would claim the
            same ids), or one was learned for a base vocabulary of another size.
    """
    found = [(name, c) for name in mm.active_names() if (c := _vocab_config(mm, name)) is not None]
    if not found:
        return tokenizer
    if len(found) > 1:
        raise VocabularyError(
            f"modules {', '.join(n for n, _ in found)} each extend the vocabulary; "
            "their new pieces take the same ids, so activate one of them at a time"
        )
    ((name, vocab),) = found
    # base_vocab 0 means the model's embedding rows (see VocabConfig)
    expected = vocab.base_vocab or int(cast(Any, mm.model).get_input_embeddings().weight.shape[0])
    if expected != len(tokenizer):
        raise VocabularyError(
            f"module '{name}' extends a vocabulary of {expected} pieces; this tokenizer has {len(tokenizer)}"
        )
    return extended_tokenizer(tokenizer, vocab.tokens)


@torch.no_grad()
def initialise_lexically(mm: ModularModel, name: str, tokenizer: Any) -> int:
    """Set each new piece's embedding to the mean embedding of the base pieces it splits into.

    A continuation piece ("##abc") is split as the text "abc"; pieces that split into unknowns only
    keep their current row. Returns the number of rows initialised.

    Raises:
        VocabularyError: module `name` has no vocabulary extension.
    """
    from .methods.vocab import VocabUnit

    vocab_config = _vocab_config(mm, name)
    units = [p for _, u in mm.units(name) for p in u.parts() if isinstance(p, VocabUnit)]
    if vocab_config is None or not units:
        raise VocabularyError(f"module '{name}' has no vocabulary extension (method 'vocab')")
    (unit,) = units
    table = cast(Any, mm.model).get_input_embeddings().weight  # (V, D), frozen
    unk = tokenizer.unk_token_id
    done = 0
    for row, piece in enumerate(vocab_config.tokens):
        ids = [
            i for i in tokenizer(piece.removeprefix("##"), add_special_tokens=False)["input_ids"] if i != unk
        ]
        if ids:
            unit.embeddings[row] = table[ids].mean(dim=0).to(unit.embeddings.dtype)
            done += 1
    return done
