"""Invertible adapters: a NICE coupling block on the token representations entering the layers,
inverted before a language-modelling head (MAD-X, Pfeiffer et al. 2020, arXiv:2005.00052; NICE,
Dinh et al. 2015, arXiv:1410.8516).

A language module trained with masked language modelling adapts the embedding space to its language
on the way in; because the MLM decoder is tied to the frozen word embeddings, the output must be
mapped back into the original space on the way out. With x split into halves x1 (H//2) and x2::

    y1 = x1 + F(x2)          y2 = x2 + G(y1)            forward, on the hidden states entering layer 0
    x2 = y2 - G(y1)          x1 = y1 - F(x2)            inverse, on the last hidden states before the head

F, G: Linear -> ReLU -> Linear with an inner width of half // reduction_factor (AdapterHub's NICE
block; reduction factor 2 gives 296,064 parameters on BERT-base). Their output layers start at zero,
so a new module is the identity. `ModularModel` applies the inverse of the running invertible units
before `mlm` and `causal-lm` heads (`invert`).

Placement: the hidden states entering the first layer of every layer stack (after the word, position
and type embeddings and their LayerNorm), where AdapterHub applies its invertible adapters too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.activations import get_activation

from ..config import ModuleConfig, check
from ..registry import register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView, TargetError
from .bottleneck import PfeifferConfig
from .union import UnionConfig, UnionUnit

_HIDDEN_KWARGS = ("hidden_states", "x", "hidden_state")


def _mlp(inputs: int, inner: int, outputs: int, activation: str) -> nn.Sequential:
    last = nn.Linear(inner, outputs)
    nn.init.zeros_(last.weight)  # the coupling starts as the identity
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(inputs, inner), get_activation(activation), last)


class InvertibleUnit(Unit):
    """A NICE coupling block on the input of one layer stack's first layer; `invert` undoes it."""

    edits_input = True

    def __init__(self, hidden: int, reduction_factor: float, activation: str) -> None:
        super().__init__()
        self.split = hidden // 2  # x1: the first `split` features, x2: the rest
        rest = hidden - self.split
        self.F = _mlp(rest, max(1, int(rest // reduction_factor)), self.split, activation)
        self.G = _mlp(self.split, max(1, int(self.split // reduction_factor)), rest, activation)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.F.parameters()).dtype

    def couple(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., hidden): y1 = x1 + F(x2), y2 = x2 + G(y1)."""
        x = x.to(self.dtype)
        x1, x2 = x[..., : self.split], x[..., self.split :]
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return torch.cat([y1, y2], dim=-1)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of `couple`: x2 = y2 - G(y1), x1 = y1 - F(x2)."""
        out_dtype = y.dtype
        y = y.to(self.dtype)
        y1, y2 = y[..., : self.split], y[..., self.split :]
        x2 = y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return torch.cat([x1, x2], dim=-1).to(out_dtype)

    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args and isinstance(args[0], torch.Tensor):
            return (self.couple(args[0]).to(args[0].dtype), *args[1:]), kwargs
        for key in _HIDDEN_KWARGS:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor):
                return args, {**kwargs, key: self.couple(value).to(value.dtype)}
        raise TypeError("invertible adapter: the first layer received no hidden states")

    def forward(self, h: Any, call: SiteCall) -> Any:
        return h


@register_method(
    "invertible", InvertibleUnit, "NICE coupling on the layers' input, inverted before LM heads (MAD-X)"
)
@dataclass(frozen=True)
class InvertibleConfig(ModuleConfig):
    """Invertible adapter settings.

    Attributes:
        reduction_factor: inner width of F and G = (hidden / 2) // reduction_factor.
        activation: of F and G (any HuggingFace activation name).
    """

    reduction_factor: float = 2.0
    activation: str = "relu"

    def __post_init__(self) -> None:
        m = self.method or "invertible"
        check(self.reduction_factor > 0, m, "reduction_factor", f"must be > 0, got {self.reduction_factor}")
        try:
            get_activation(self.activation)
        except KeyError:
            check(False, m, "activation", f"unknown activation '{self.activation}'")

    def build(self, view: ModelView) -> list[Attachment]:
        """One unit on the first layer of every layer stack (encoder and decoder of T5)."""
        if view.hidden_size is None:
            raise TargetError(f"invertible: cannot read hidden_size from the {view.model_type} config")
        firsts: dict[str, str] = {}
        for ref in view.layers():
            firsts.setdefault(ref.group.path, ref.path)
        return [
            Attachment(path, InvertibleUnit(view.hidden_size, self.reduction_factor, self.activation))
            for path in firsts.values()
        ]


@register_method(
    "pfeiffer_inv", UnionUnit, "MAD-X language adapter: Pfeiffer adapter + invertible adapter (union)"
)
@dataclass(frozen=True)
class PfeifferInvConfig(UnionConfig):
    """AdapterHub's `SeqBnInvConfig` ("pfeiffer+inv"): reduction factor 16 and a NICE block with 2."""

    components: tuple[ModuleConfig, ...] = (PfeifferConfig(), InvertibleConfig())
