"""Task heads: the small output layers trained with a module and saved with it, labels included.

A head reads the base model's last hidden states (batch, seq, hidden) and returns logits:

- `seq-cls`: pool (mean over real tokens, the first token, or the last real token) -> dense ->
  tanh -> dropout -> linear -> (batch, labels);
- `token-cls`: dropout -> linear per token -> (batch, seq, labels);
- `mlm`: dense -> gelu -> LayerNorm -> the frozen input word embeddings as decoder (tied, as in
  BERT) + a trained bias -> (batch, seq, vocab);
- `causal-lm`: the base model's own (frozen) output embeddings, or the tied input embeddings when
  the model has none -> (batch, seq, vocab). It trains nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError

Task = Literal["seq-cls", "token-cls", "mlm", "causal-lm"]
TASKS: tuple[str, ...] = ("seq-cls", "token-cls", "mlm", "causal-lm")
Pooling = Literal["mean", "first", "last"]


@dataclass(frozen=True)
class HeadConfig:
    """A head: its task, label names (classification tasks) and pooling.

    Attributes:
        task: one of seq-cls, token-cls, mlm, causal-lm.
        labels: label names in id order (required for seq-cls and token-cls).
        pooling: seq-cls pooling: "mean" over real tokens, "first" token, "last" real token.
        dropout: dropout before the output layer.
    """

    task: str
    labels: tuple[str, ...] = field(default_factory=tuple)
    pooling: Pooling = "mean"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"head.task: unknown task '{self.task}'; use one of {', '.join(TASKS)}")
        if self.task in ("seq-cls", "token-cls") and len(self.labels) < 2:
            raise ConfigError(
                f"head.labels: a {self.task} head needs at least 2 labels, got {list(self.labels)}"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"head.labels: duplicate label names in {list(self.labels)}")
        if self.pooling not in ("mean", "first", "last"):
            raise ConfigError(f"head.pooling: unknown pooling '{self.pooling}'; use mean, first or last")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "labels": list(self.labels),
            "pooling": self.pooling,
            "dropout": self.dropout,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HeadConfig:
        try:
            return cls(
                task=values["task"],
                labels=tuple(values.get("labels", ())),
                pooling=values.get("pooling", "mean"),
                dropout=float(values.get("dropout", 0.1)),
            )
        except KeyError as e:
            raise ConfigError(f"head: missing key {e}") from None


def head(task: str, labels: list[str] | tuple[str, ...] = (), **options: Any) -> HeadConfig:
    """Shorthand for `HeadConfig(task, tuple(labels), **options)`."""
    return HeadConfig(task=task, labels=tuple(labels), **options)


class _Ref:
    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module


class Head(nn.Module):
    """Base of heads: `forward(hidden, attention_mask) -> logits`."""

    config: HeadConfig

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover


class SequenceClassificationHead(Head):
    def __init__(self, config: HeadConfig, hidden: int) -> None:
        super().__init__()
        self.config = config
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(hidden, len(config.labels))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pooled = pool(hidden, attention_mask, self.config.pooling)  # (batch, hidden)
        return self.out(self.dropout(torch.tanh(self.dense(pooled))))


class TokenClassificationHead(Head):
    def __init__(self, config: HeadConfig, hidden: int) -> None:
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(hidden, len(config.labels))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.out(self.dropout(hidden))  # (batch, seq, labels)


class MaskedLmHead(Head):
    """BERT-style transform with its decoder tied to the frozen input embeddings.

    The transform maps to the embedding width, which is not the hidden size in every family
    (ELECTRA's `embedding_size`), as ELECTRA's own generator head does.
    """

    def __init__(self, config: HeadConfig, hidden: int, embeddings: nn.Module) -> None:
        super().__init__()
        self.config = config
        weight = embeddings.weight
        assert isinstance(weight, torch.Tensor)
        vocab, width = weight.shape  # (vocab, embedding width)
        self.dense = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)
        self._embeddings = _Ref(embeddings)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.logits(hidden)

    def logits(
        self, hidden: torch.Tensor, extra_rows: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """(batch, seq, vocab) scores; `extra_rows` (embeddings (n, width), bias (n,)) append the
        pieces of a vocabulary extension after the base vocabulary (`methods/vocab.py`)."""
        x = self.norm(F.gelu(self.dense(hidden)))
        weight = cast(torch.Tensor, self._embeddings.module.weight)  # (vocab, width), frozen, tied to input
        bias: torch.Tensor = self.bias
        if extra_rows:
            weight = torch.cat([weight.to(x.dtype), *(rows.to(x.dtype) for rows, _ in extra_rows)])
            bias = torch.cat([bias, *(b.to(bias.dtype) for _, b in extra_rows)])
        return F.linear(x, weight.to(x.dtype), bias)


class CausalLmHead(Head):
    """The base model's own output embeddings (or tied input embeddings); no parameters."""

    def __init__(self, config: HeadConfig, hidden: int, embeddings: nn.Module) -> None:
        super().__init__()
        self.config = config
        self._embeddings = _Ref(embeddings)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        module = self._embeddings.module
        if isinstance(module, nn.Linear):
            return module(hidden)
        return F.linear(hidden, cast(torch.Tensor, module.weight))


def build_head(config: HeadConfig, hidden: int, model: nn.Module) -> Head:
    """Create the head for `config` on `model` (whose embeddings LM heads reuse)."""
    if config.task == "seq-cls":
        return SequenceClassificationHead(config, hidden)
    if config.task == "token-cls":
        return TokenClassificationHead(config, hidden)
    get_input = getattr(model, "get_input_embeddings", None)
    if get_input is None:
        raise ConfigError(f"a {config.task} head needs a model with get_input_embeddings()")
    if config.task == "mlm":
        return MaskedLmHead(config, hidden, get_input())
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if get_output is not None else None
    return CausalLmHead(config, hidden, output if output is not None else get_input())


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, hidden) by masked mean, first token or last real token."""
    if how == "first":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
    if how == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    # last real token; right padding assumed (left padding puts it at the end anyway)
    last = attention_mask.long().cumsum(1).argmax(1)  # (batch,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def head_loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for the task; -100 labels are ignored; causal LM predicts the next token."""
    if task == "seq-cls":
        return F.cross_entropy(logits, labels)
    if task == "causal-lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    if not bool((labels != -100).any()):
        # No target in the batch (e.g. MLM masking chose nothing): a zero loss that keeps the graph,
        # where the mean over zero targets would be NaN and poison the weights.
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
