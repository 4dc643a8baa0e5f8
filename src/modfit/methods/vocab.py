"""Vocabulary extension: new word pieces for a language, their embeddings trained in the module
(the MAD-X follow-up for unseen scripts and poorly covered languages, Pfeiffer et al. 2021,
"UNKs Everywhere", arXiv:2012.15562).

The base tokenizer's vocabulary (V pieces) is extended by `tokens` (n pieces learned from target-
language text, see `modfit.vocabulary`), which take ids V .. V+n-1. The frozen word embeddings only
know ids < V, so the unit on the word-embedding module swaps the new ids for the unknown token before
the lookup and puts its own trained rows in their place after it::

    ids (B, L) -> lookup(ids < V ? ids : unk) (B, L, D) -> rows of new ids replaced by E_new[ids - V]

E_new (n, D) starts from the mean embedding of the pieces the base tokenizer splits each new piece
into ("lexical" init, done by `modfit.vocabulary.extend_vocabulary`). A masked-LM head scores the new
pieces too: its decoder gets E_new as extra rows and this unit's bias for them (`decoder_rows`).
The extended tokenizer is rebuilt from the base tokenizer and `tokens` (`vocabulary.extended_tokenizer`),
so a saved module needs no tokenizer files of its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from ..config import ModuleConfig, check
from ..registry import register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView, TargetError


class VocabUnit(Unit):
    """The embeddings of the new pieces, on the word-embedding module.

    Args:
        base_vocab: V, the number of ids the frozen embeddings know.
        count: n new pieces; width: the embedding width D; unk_id: the id looked up in their place.
    """

    edits_input = True
    stage: ClassVar[int] = 0

    def __init__(self, base_vocab: int, count: int, width: int, unk_id: int) -> None:
        super().__init__()
        self.base_vocab, self.unk_id = base_vocab, unk_id
        self.embeddings = nn.Parameter(torch.zeros(count, width))  # (n, D); set by extend_vocabulary
        self.decoder_bias = nn.Parameter(torch.zeros(count))  # an MLM head's bias for the new ids
        self._ids = threading.local()

    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        ids = args[0] if args else kwargs.get("input")
        if not isinstance(ids, torch.Tensor):
            return args, kwargs
        new = ids >= self.base_vocab
        if ids.numel() and int(ids.max()) >= self.base_vocab + self.embeddings.shape[0]:
            raise ValueError(
                f"vocab: token id {int(ids.max())} is past the extended vocabulary "
                f"({self.base_vocab} + {self.embeddings.shape[0]} pieces)"
            )
        self._ids.value = ids if bool(new.any()) else None
        safe = torch.where(new, torch.full_like(ids, self.unk_id), ids)
        return ((safe, *args[1:]), kwargs) if args else (args, {**kwargs, "input": safe})

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        ids = getattr(self._ids, "value", None)
        self._ids.value = None
        if ids is None:
            return h
        new = (ids >= self.base_vocab).unsqueeze(-1)  # (B, L, 1)
        rows = self.embeddings[(ids - self.base_vocab).clamp(min=0)].to(h.dtype)  # (B, L, D)
        return torch.where(new, rows, h)

    def decoder_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E_new (n, D), bias (n,)): what a tied LM decoder appends for the new ids."""
        return self.embeddings, self.decoder_bias


@register_method(
    "vocab",
    VocabUnit,
    "new word pieces with trained embeddings (vocabulary extension, Pfeiffer et al. 2021)",
    standalone=False,  # meaningful only with the tokenizer that produces its ids
)
@dataclass(frozen=True)
class VocabConfig(ModuleConfig):
    """Vocabulary extension settings.

    Attributes:
        tokens: the new word pieces, in id order after the base vocabulary (WordPiece notation:
            "##" marks a continuation piece). `modfit.vocabulary.learn_pieces` finds them.
        base_vocab: the base tokenizer's vocabulary size V (the first new id); 0: the model's.
        unk_id: the id looked up for new pieces before their own rows replace it.
    """

    tokens: tuple[str, ...] = ()
    base_vocab: int = 0
    unk_id: int = 0

    def __post_init__(self) -> None:
        check(len(self.tokens) > 0, "vocab", "tokens", "name at least one new piece")
        check(len(set(self.tokens)) == len(self.tokens), "vocab", "tokens", "has duplicate pieces")
        check(self.base_vocab >= 0, "vocab", "base_vocab", f"must be >= 0, got {self.base_vocab}")

    def build(self, view: ModelView) -> list[Attachment]:
        """One `VocabUnit` on the word embeddings."""
        if view.arch is None:
            raise TargetError(f"vocab: model type '{view.model_type}' is not in modfit's architecture table")
        path = view.arch.embeddings
        weight = cast(torch.Tensor, view.module(path).weight)
        vocab = self.base_vocab or int(weight.shape[0])
        if vocab > weight.shape[0]:
            raise TargetError(
                f"vocab: base_vocab {vocab} is larger than the model's {weight.shape[0]} embeddings"
            )
        return [Attachment(path, VocabUnit(vocab, len(self.tokens), int(weight.shape[1]), self.unk_id))]
